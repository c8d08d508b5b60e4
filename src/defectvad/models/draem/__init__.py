# src/defectvad/models/draem/__init__.py
