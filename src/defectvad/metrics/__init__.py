# src/defectvad/metrics/__init__.py
