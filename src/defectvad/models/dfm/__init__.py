# src/defectvad/models/dfm/__init__.py
