# src/defectvad/models/dinomaly/__init__.py
