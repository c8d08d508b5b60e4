# src/defectvad/data/__init__.py
