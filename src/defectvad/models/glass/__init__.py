# src/defectvad/models/glass/__init__.py
