# src/defectvad/sweeps/__init__.py
