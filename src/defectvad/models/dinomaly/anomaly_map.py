# src/defectvad/models/dinomaly/anomaly_map.py
import torch
from torch.nn import functional as F


def calculate_anomaly_maps(encoder_maps, decoder_maps, out_size):
    # per fuse group 1 - cosine between the encoder and decoder features of each patch, upsampled to out_size
    # (bilinear, corners aligned); the anomaly map is their mean. Returns the map and the per-group maps
    if isinstance(out_size, int):
        out_size = (out_size, out_size)
    group_maps = []
    for encoder, decoder in zip(encoder_maps, decoder_maps):
        group_map = (1 - F.cosine_similarity(encoder, decoder)).unsqueeze(1)
        group_maps.append(F.interpolate(group_map, size=tuple(out_size), mode="bilinear", align_corners=True))
    return torch.cat(group_maps, dim=1).mean(dim=1, keepdim=True), group_maps
