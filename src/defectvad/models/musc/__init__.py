# src/defectvad/models/musc/__init__.py
