# src/defectvad/models/patch_knn/__init__.py
