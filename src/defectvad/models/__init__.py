# src/defectvad/models/__init__.py
