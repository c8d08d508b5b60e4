# src/defectvad/models/reverse_distillation/loss.py
import torch
from torch import nn
from torch.nn import functional as F


class ReverseDistillationLoss(nn.Module):
    def forward(self, encoder_features, decoder_features):
        loss = 0
        for encoder_feature, decoder_feature in zip(encoder_features, decoder_features, strict=True):
            # one cosine distance per image, between whole flattened feature maps
            similarity = F.cosine_similarity(encoder_feature.flatten(1), decoder_feature.flatten(1))
            loss = loss + torch.mean(1 - similarity)
        return loss
