# src/defectvad/engine/inference_batch.py
from dataclasses import dataclass, field

import torch


@dataclass
class InferenceBatch:
    # what every model returns in evaluation: pred_score (B,) and anomaly_map (B, 1, H, W) at the input
    # resolution, plus whatever else a model wants to show (a reconstruction, class tokens) in extras;
    # outputs["pred_score"] still works, so code written for the old dicts keeps running
    pred_score: torch.Tensor
    anomaly_map: torch.Tensor
    extras: dict = field(default_factory=dict)

    def __getitem__(self, key):
        if key in ("pred_score", "anomaly_map"):
            return getattr(self, key)
        return self.extras[key]

    def __contains__(self, key):
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def keys(self):
        return ["pred_score", "anomaly_map", *self.extras]

    def get(self, key, default=None):
        return self[key] if key in self else default
