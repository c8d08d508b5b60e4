# src/defectvad/models/dfkde/__init__.py
