# src/defectvad/models/autoencoder/__init__.py
