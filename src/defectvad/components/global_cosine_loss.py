# src/defectvad/components/global_cosine_loss.py
# the reconstruction loss of Dinomaly and INP-Former: per fuse group, 1 - cosine between the whole encoder and
# decoder maps of each image (flattened), averaged over images and groups; the decoder's gradient at each point is
# reweighted by a function of the point-wise cosine distances (the models' hard or soft mining)
import torch
from torch.nn import functional as F


def scale_gradient(tensor, weight):
    # the same values; in the backward pass the gradient is multiplied by weight (broadcast over the tensor),
    # what anomalib's losses do with a gradient hook
    return tensor.detach() + (tensor - tensor.detach()) * weight


def global_cosine_loss(encoder_features, decoder_features, gradient_weight):
    # features: lists of (B, C, H, W) maps; gradient_weight: point distances (B, 1, H, W) -> weights of that shape
    loss = torch.tensor(0.0, device=encoder_features[0].device)
    for encoder, decoder in zip(encoder_features, decoder_features):
        encoder = encoder.detach()
        with torch.no_grad():
            weight = gradient_weight(1 - F.cosine_similarity(encoder, decoder).unsqueeze(1))
        decoder = scale_gradient(decoder, weight.to(decoder.dtype))
        batch = encoder.shape[0]
        loss = loss + torch.mean(1 - F.cosine_similarity(encoder.reshape(batch, -1), decoder.reshape(batch, -1)))
    return loss / len(encoder_features)
