# src/defectvad/models/efficient_ad/__init__.py
