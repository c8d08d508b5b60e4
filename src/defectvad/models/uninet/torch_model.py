# src/defectvad/models/uninet/torch_model.py
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import get_backbone
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError
from defectvad.models.reverse_distillation.decoder import ResNetDecoder
from defectvad.models.reverse_distillation.torch_model import ARCHITECTURES
from defectvad.models.uninet.anomaly_map import weighted_decision_mechanism
from defectvad.models.uninet.bottleneck import BottleneckLayer
from defectvad.models.uninet.feature_selection import DomainRelatedFeatureSelection


class Teacher(nn.Module):
    # the backbone up to its third stage, its modules under their own names (conv1, bn1, layer1, ...), as
    # anomalib's torchvision graph module holds them; returns the first three stages, shallow to deep
    def __init__(self, backbone, weights_path=None, requires_grad=True):
        super().__init__()
        extractor = FeatureExtractor(backbone, get_backbone(backbone).stages[:3], weights_path=weights_path,
                                     requires_grad=requires_grad)
        for name, module in extractor.feature_extractor.items():
            self.add_module(name, module)
        self.steps = extractor.steps
        self.paths = list(extractor.paths.values())

    def forward(self, x):
        found = {}
        for step in self.steps:
            x = self.get_submodule(step)(x)
            found[step] = x
        return [found[path] for path in self.paths]


class Teachers(nn.Module):
    # the source teacher is frozen and always in evaluation mode (anomalib sets it once, and Lightning keeps each
    # module's mode); the target teacher trains with a small learning rate
    def __init__(self, backbone, weights_path=None):
        super().__init__()
        self.source_teacher = Teacher(backbone, weights_path, requires_grad=False).eval()
        self.target_teacher = Teacher(backbone, weights_path)

    def forward(self, images):
        self.source_teacher.eval()
        with torch.no_grad():
            source_features = self.source_teacher(images)
        target_features = self.target_teacher(images)
        bottleneck_inputs = [torch.cat([target, source], dim=0)
                             for target, source in zip(target_features, source_features, strict=True)]
        return source_features + target_features, bottleneck_inputs


def check_backbones(teacher_backbone, student_backbone):
    for name in (teacher_backbone, student_backbone):
        if name not in ARCHITECTURES:
            raise ConfigError(f"UniNet has no student decoder for backbone '{name}'; "
                              f"choose one of: {', '.join(ARCHITECTURES)}")
    channels = [[get_backbone(name).layers[layer][0] for layer in get_backbone(name).stages[:3]]
                for name in (teacher_backbone, student_backbone)]
    if channels[0] != channels[1]:
        raise ConfigError(f"UniNet's student_backbone '{student_backbone}' has channels {channels[1]}, the teacher "
                          f"'{teacher_backbone}' {channels[0]}; they must match (null: the teacher's backbone)")
    return channels[0]


class UniNetModel(nn.Module):
    def __init__(self, backbone="wide_resnet50_2", student_backbone=None, weights_path=None):
        super().__init__()
        student_backbone = student_backbone or backbone
        channels = check_backbones(backbone, student_backbone)
        self.backbone = backbone
        self.student_backbone = student_backbone
        self.teachers = Teachers(backbone, weights_path)
        _, _, decoder_block, decoder_layers, width = ARCHITECTURES[student_backbone]
        self.student = ResNetDecoder(decoder_block, decoder_layers, channels, width_per_group=width)
        self.bottleneck = BottleneckLayer(channels, blocks=3)
        self.dfs = DomainRelatedFeatureSelection(channels)
        # the authors' decoder ends in a classifier on its finest features; its BCE term reaches the student,
        # but it is in no optimizer group and keeps its initial weights (as anomalib)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(channels[0], 1)

    def forward(self, images):
        teacher_features, bottleneck_inputs = self.teachers(images)
        decoded = self.student(self.bottleneck(bottleneck_inputs))
        # first halves: decoded from the target teacher's features, compared with the source teacher's;
        # second halves: from the source teacher's, compared with the target teacher's
        halves = [feature.chunk(2, dim=0) for feature in decoded]
        student_features = [half[0] for half in halves] + [half[1] for half in halves]
        if self.training:
            predictions = self.fc(torch.flatten(self.avgpool(decoded[0]), 1)).reshape(-1).chunk(2, dim=0)
            return self.dfs(student_features, teacher_features), teacher_features, predictions
        distances = [1 - F.cosine_similarity(teacher, student)
                     for teacher, student in zip(teacher_features, student_features, strict=True)]
        pred_score, anomaly_map = weighted_decision_mechanism(distances, images.shape[-2:])
        return InferenceBatch(pred_score, anomaly_map)
