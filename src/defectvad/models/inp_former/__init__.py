# src/defectvad/models/inp_former/__init__.py
