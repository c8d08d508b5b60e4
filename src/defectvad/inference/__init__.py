# src/defectvad/inference/__init__.py
