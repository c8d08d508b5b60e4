# src/defectvad/models/cfa/__init__.py
