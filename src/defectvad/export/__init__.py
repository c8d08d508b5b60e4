# src/defectvad/export/__init__.py
