# src/defectvad/__init__.py
