# src/defectvad/models/padim/__init__.py
