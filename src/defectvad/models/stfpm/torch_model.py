# src/defectvad/models/stfpm/torch_model.py
import torch
from torch import nn

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import resolve_layers
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.models.stfpm.anomaly_map import AnomalyMapGenerator


class StfpmModel(nn.Module):
    def __init__(self, backbone="resnet18", layers=None, weights_path=None):
        super().__init__()
        self.backbone = backbone
        self.layers = resolve_layers(backbone, layers, (0, 1, 2))
        # the teacher is frozen and always runs with its own BatchNorm statistics
        self.teacher_model = FeatureExtractor(backbone, self.layers, weights_path=weights_path).eval()
        self.student_model = FeatureExtractor(backbone, self.layers, weights_path=None, requires_grad=True)
        self.anomaly_map_generator = AnomalyMapGenerator()

    def forward(self, images):
        teacher_features = self.teacher_model(images)
        student_features = self.student_model(images)
        if self.training:
            return teacher_features, student_features
        anomaly_map = self.anomaly_map_generator(teacher_features, student_features, images.shape[-2:])
        return InferenceBatch(torch.amax(anomaly_map, dim=(-2, -1)).reshape(-1), anomaly_map)
