# src/defectvad/models/dinomaly/loss.py
# Dinomaly's loose loss: per fuse group, 1 - cosine between the whole encoder and decoder maps of each image
# (flattened), averaged over the groups; in the backward pass the gradient of the well reconstructed decoder
# points (those closer than the p-th share of hardest points, by point-wise cosine distance) is multiplied by factor.
# p grows linearly from 0 to p_final over p_schedule_steps training steps
import torch
from torch import nn
from torch.nn import functional as F


def scale_gradient(tensor, where, factor):
    # the same values; in the backward pass the gradient is multiplied by factor where `where` holds
    weight = torch.where(where, factor, 1.0).to(tensor.dtype)
    return tensor.detach() + (tensor - tensor.detach()) * weight


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

    def forward(self, encoder_features, decoder_features, global_step):
        # features: lists of (B, C, H, W) maps, one per fuse group
        self.update_p(global_step)
        loss = torch.tensor(0.0, device=encoder_features[0].device)
        for encoder, decoder in zip(encoder_features, decoder_features):
            encoder = encoder.detach()
            with torch.no_grad():
                point_distance = 1 - F.cosine_similarity(encoder, decoder).unsqueeze(1)
                count = max(1, int(point_distance.numel() * (1 - self.p)))
                threshold = torch.topk(point_distance.reshape(-1), k=count)[0][-1]
            decoder = scale_gradient(decoder, point_distance < threshold, self.factor)
            batch = encoder.shape[0]
            loss = loss + torch.mean(1 - F.cosine_similarity(encoder.reshape(batch, -1), decoder.reshape(batch, -1)))
        return loss / len(encoder_features)
