# src/defectvad/models/winclip/__init__.py
