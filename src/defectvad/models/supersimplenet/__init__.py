# src/defectvad/models/supersimplenet/__init__.py
