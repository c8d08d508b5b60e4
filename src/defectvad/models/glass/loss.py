# src/defectvad/models/glass/loss.py
import torch
from torch import nn


class FocalLoss(nn.Module):
    # focal loss on class probabilities (B, C, ...) with smoothed one-hot targets (B, 1, ...):
    # -alpha * (1 - pt) ** gamma * log(pt), pt = the probability of the target class (+ smooth);
    # alpha: None (1 for every class), a float (alpha for balance_index, 1 - alpha for the others) or per-class
    def __init__(self, apply_nonlinearity=None, alpha=None, gamma=2, balance_index=0, smooth=1e-5,
                 size_average=True):
        super().__init__()
        if smooth is not None and not 0 <= smooth <= 1:
            raise ValueError("smooth value should be in [0,1]")
        self.apply_nonlinearity = apply_nonlinearity
        self.alpha = alpha
        self.gamma = gamma
        self.balance_index = balance_index
        self.smooth = smooth
        self.size_average = size_average

    def class_weights(self, num_classes):
        if self.alpha is None:
            return torch.ones(num_classes, 1)
        if isinstance(self.alpha, float):
            weights = torch.full((num_classes, 1), 1 - self.alpha)
            weights[self.balance_index] = self.alpha
            return weights
        weights = torch.as_tensor(self.alpha, dtype=torch.float32).reshape(num_classes, 1)
        return weights / weights.sum()

    def forward(self, logits, target):
        if self.apply_nonlinearity is not None:
            logits = self.apply_nonlinearity(logits)
        num_classes = logits.shape[1]
        if logits.dim() > 2:
            logits = logits.reshape(logits.shape[0], num_classes, -1).permute(0, 2, 1).reshape(-1, num_classes)
        index = target.squeeze(1).reshape(-1, 1).to(device=logits.device, dtype=torch.long)
        one_hot = torch.zeros(index.shape[0], num_classes, device=logits.device, dtype=logits.dtype)
        one_hot.scatter_(1, index, 1)
        if self.smooth:
            one_hot = one_hot.clamp(self.smooth / (num_classes - 1), 1.0 - self.smooth)
        pt = (one_hot * logits).sum(1) + self.smooth
        alpha = self.class_weights(num_classes).to(logits.device)[index].squeeze()
        loss = -alpha * (1 - pt) ** self.gamma * pt.log()
        return loss.mean() if self.size_average else loss.sum()
