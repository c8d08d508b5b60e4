# src/defectvad/models/fastflow/__init__.py
