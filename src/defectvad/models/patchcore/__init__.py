# src/defectvad/models/patchcore/__init__.py
