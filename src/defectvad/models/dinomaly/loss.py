# src/defectvad/models/dinomaly/loss.py
# Dinomaly's loose loss (the global cosine loss) with hard mining: in the backward pass the gradient of the well
# reconstructed decoder points (those closer than the p-th share of hardest points, by point-wise cosine distance)
# is multiplied by factor. p grows linearly from 0 to p_final over p_schedule_steps training steps
import torch
from torch import nn

from defectvad.components.global_cosine_loss import global_cosine_loss


class CosineHardMiningLoss(nn.Module):
    def __init__(self, p_final=0.9, p_schedule_steps=1000, factor=0.1):
        super().__init__()
        self.p_final = p_final
        self.p_schedule_steps = p_schedule_steps
        self.factor = factor
        self.p = 0.0

    def update_p(self, global_step):
        self.p = min(self.p_final * global_step / self.p_schedule_steps, self.p_final)
        return self.p

    def mine_hard_points(self, point_distance):
        count = max(1, int(point_distance.numel() * (1 - self.p)))
        threshold = torch.topk(point_distance.reshape(-1), k=count)[0][-1]
        return torch.where(point_distance < threshold, self.factor, 1.0)

    def forward(self, encoder_features, decoder_features, global_step):
        self.update_p(global_step)
        return global_cosine_loss(encoder_features, decoder_features, self.mine_hard_points)
