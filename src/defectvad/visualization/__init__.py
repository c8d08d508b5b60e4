# src/defectvad/visualization/__init__.py
