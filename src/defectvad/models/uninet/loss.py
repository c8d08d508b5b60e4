# src/defectvad/models/uninet/loss.py
import torch
from torch import nn
from torch.nn import functional as F


class UniNetLoss(nn.Module):
    # per scale: lambda * cosine distance + (1 - lambda) * contrastive loss (each student position against all
    # teacher positions of its image, temperature-scaled) + margin losses on the matching position's probability
    def __init__(self, lambda_weight=0.7, temperature=2.0):
        super().__init__()
        self.lambda_weight = lambda_weight
        self.temperature = temperature

    def forward(self, student_features, teacher_features, margin=1, mask=None, stop_gradient=False):
        loss = 0.0
        # as anomalib: the anomalous margin term is set once per call, so a scale where the mask has no anomalous
        # position repeats the previous scale's term
        margin_loss_a = 0.0
        for student, teacher in zip(student_features, teacher_features, strict=True):
            teacher = teacher.detach() if stop_gradient else teacher
            batch, channels, height, width = student.shape
            student = F.normalize(student.reshape(batch, channels, -1).transpose(1, 2), p=2, dim=2)
            teacher = F.normalize(teacher.reshape(batch, channels, -1).transpose(1, 2), p=2, dim=2)
            cosine_loss = (1 - F.cosine_similarity(student, teacher, dim=2)).mean()
            similarity = torch.exp(torch.matmul(student, teacher.transpose(1, 2)) / self.temperature)
            similarity = similarity / (similarity.sum(dim=2, keepdim=True) + 1e-8)
            matching = torch.diagonal(similarity, dim1=1, dim2=2)
            if mask is None:
                contrastive_loss = -torch.log(matching + 1e-8).mean()
                margin_loss_n = F.relu(margin - matching).mean()
            else:
                if mask.dim() < 3:
                    # image labels (B,)
                    normal, abnormal = mask == 0, mask == 1
                else:
                    # pixel masks (B, 1, H, W)
                    scaled = F.interpolate(mask, size=(height, width), mode="nearest").view(batch, -1)
                    normal, abnormal = scaled == 0, scaled == 1
                if normal.sum() > 0:
                    contrastive_loss = -torch.log(matching[normal] + 1e-8).mean()
                    margin_loss_n = F.relu(margin - matching[normal]).mean()
                if abnormal.sum() > 0:
                    margin_loss_a = F.relu(matching[abnormal] - margin / 2).mean()
            margin_loss = margin_loss_n + margin_loss_a
            loss = loss + (cosine_loss * self.lambda_weight + contrastive_loss * (1 - self.lambda_weight) + margin_loss)
        return loss
