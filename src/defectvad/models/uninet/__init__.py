# src/defectvad/models/uninet/__init__.py
