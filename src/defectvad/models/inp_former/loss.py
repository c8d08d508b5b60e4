# src/defectvad/models/inp_former/loss.py
# INP-Former's loss: the global cosine loss with soft mining (the authors' global_cosine_hm_adaptive: the gradient
# at each decoder point is multiplied by (its cosine distance / the mean distance) ** power, so hard points learn
# most) plus 0.2 times the INP coherence loss
from torch import nn
from torch.nn import functional as F

from defectvad.components.global_cosine_loss import global_cosine_loss


def calculate_inp_loss(features, prototypes):
    # INP coherence: the mean over tokens of the cosine distance to the nearest prototype.
    # features (B, N, C), prototypes (B, M, C)
    distance = 1.0 - F.cosine_similarity(features.unsqueeze(2), prototypes.unsqueeze(1), dim=-1)
    return distance.min(dim=2).values.mean()


class GlobalCosineHmAdaptiveLoss(nn.Module):
    def __init__(self, power=3, inp_loss_weight=0.2):
        super().__init__()
        self.power = power
        self.inp_loss_weight = inp_loss_weight

    def weigh_points(self, point_distance):
        return (point_distance / point_distance.mean()) ** self.power

    def forward(self, encoder_features, decoder_features, inp_loss):
        loss = global_cosine_loss(encoder_features, decoder_features, self.weigh_points)
        return loss + self.inp_loss_weight * inp_loss
