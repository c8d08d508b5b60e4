# src/defectvad/models/reverse_distillation/__init__.py
