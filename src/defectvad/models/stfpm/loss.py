# src/defectvad/models/stfpm/loss.py
import torch
from torch import nn
from torch.nn import functional as F


class StfpmLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.mse_loss = nn.MSELoss(reduction="sum")

    def compute_layer_loss(self, teacher_features, student_features):
        height, width = teacher_features.shape[2:]
        teacher = F.normalize(teacher_features)
        student = F.normalize(student_features)
        return (0.5 / (width * height)) * self.mse_loss(teacher, student)

    def forward(self, teacher_features, student_features):
        return torch.stack([
            self.compute_layer_loss(teacher_features[layer], student_features[layer]) for layer in teacher_features
        ]).sum()
