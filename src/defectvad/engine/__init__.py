# src/defectvad/engine/__init__.py
