# src/defectvad/engine/early_stopping.py
import math


class EarlyStopping:
    def __init__(self, monitor, patience=3, mode="max", min_delta=0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"early stopping mode must be 'min' or 'max', got '{mode}'")
        self.monitor = monitor
        self.patience = patience
        self.mode = mode
        self.min_delta = min_delta
        self.best = None
        self.bad_epochs = 0

    def is_improvement(self, value):
        if value is None or math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def update(self, value):
        improved = self.is_improvement(value)
        if improved:
            self.best = value
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self):
        return self.bad_epochs >= self.patience
