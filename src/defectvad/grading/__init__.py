# src/defectvad/grading/__init__.py
