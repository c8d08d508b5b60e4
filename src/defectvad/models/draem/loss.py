# src/defectvad/models/draem/loss.py
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.components.ssim import SSIMLoss


class FocalLoss(nn.Module):
    # softmax focal loss on per-pixel class logits (B, C, H, W) and labels (B, H, W).
    # alpha None: every pixel weighs 1, mean over pixels (DRAEM's paper; anomalib's alpha=1 under kornia < 0.7).
    # alpha a float: class 1 weighs alpha and class 0 1 - alpha, mean over pixels and classes (kornia >= 0.7,
    # so alpha=1 is anomalib 2.x with today's kornia, where normal pixels add nothing)
    def __init__(self, alpha=None, gamma=2.0):
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, prediction, target):
        log_probability = F.log_softmax(prediction, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        loss = -((1 - log_probability.exp()) ** self.gamma) * log_probability
        if self.alpha is None:
            return loss.mean()
        weight = torch.where(target == 0, 1.0 - self.alpha, float(self.alpha))
        return (weight * loss).mean() / prediction.shape[1]


class DraemLoss(nn.Module):
    def __init__(self, focal_alpha=None):
        super().__init__()
        self.l2_loss = nn.MSELoss()
        self.focal_loss = FocalLoss(alpha=focal_alpha)
        self.ssim_loss = SSIMLoss(window_size=11)

    def forward(self, input_image, reconstruction, anomaly_mask, prediction):
        l2 = self.l2_loss(reconstruction, input_image)
        focal = self.focal_loss(prediction, anomaly_mask.squeeze(1).long())
        ssim = self.ssim_loss(reconstruction, input_image)
        return l2 + ssim + focal
