# src/defectvad/components/__init__.py
