# src/defectvad/models/ensemble/__init__.py
