# src/defectvad/models/supersimplenet/loss.py
import torch
from torch import nn
from torch.nn import functional as F


def sigmoid_focal_loss(logits, target, gamma=4.0):
    # binary focal loss on logits, no class weighting (torchvision's with alpha=-1), mean over elements
    probability = torch.sigmoid(logits)
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = probability * target + (1 - probability) * (1 - target)
    return (cross_entropy * (1 - p_t) ** gamma).mean()


class SSNLoss(nn.Module):
    # focal(map) + truncated L1(map) + focal(score)
    def __init__(self, truncation_term=0.5, gamma=4.0):
        super().__init__()
        self.th = truncation_term
        self.gamma = gamma

    def trunc_l1_loss(self, pred, target):
        # normal logits are pushed below -th, anomalous ones above th; each side is a mean of its own
        normal = torch.clamp(pred[target == 0] + self.th, min=0)
        anomalous = torch.clamp(-pred[target > 0] + self.th, min=0)
        zero = pred.new_zeros(())
        return (normal.mean() if normal.numel() else zero) + (anomalous.mean() if anomalous.numel() else zero)

    def focal_loss(self, pred, target):
        return sigmoid_focal_loss(pred, target, self.gamma)

    def forward(self, pred_map, pred_score, target_mask, target_label):
        return (self.focal_loss(pred_map, target_mask) + self.trunc_l1_loss(pred_map, target_mask)
                + self.focal_loss(pred_score, target_label))
