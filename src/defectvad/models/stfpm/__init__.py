# src/defectvad/models/stfpm/__init__.py
