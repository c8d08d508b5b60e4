# src/defectvad/models/stfpm/anomaly_map.py
import torch
from torch import nn
from torch.nn import functional as F


class AnomalyMapGenerator(nn.Module):
    @staticmethod
    def compute_layer_map(teacher_features, student_features, image_size):
        teacher = F.normalize(teacher_features)
        student = F.normalize(student_features)
        layer_map = 0.5 * torch.norm(teacher - student, p=2, dim=-3, keepdim=True) ** 2
        return F.interpolate(layer_map, size=tuple(image_size), mode="bilinear", align_corners=False)

    def forward(self, teacher_features, student_features, image_size):
        anomaly_map = None
        for layer in teacher_features:
            layer_map = self.compute_layer_map(teacher_features[layer], student_features[layer], image_size)
            anomaly_map = layer_map if anomaly_map is None else anomaly_map * layer_map
        return anomaly_map
