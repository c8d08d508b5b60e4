# src/defectvad/models/anomaly_dino/__init__.py
