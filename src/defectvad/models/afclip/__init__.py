# src/defectvad/models/afclip/__init__.py
