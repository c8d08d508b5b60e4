# src/defectvad/models/musc/msm.py
# MuSc's mutual scoring (MSM): each patch of each image is compared with every other image of the set: its
# distance to that image's nearest patch; the patch's score is the mean of those N - 1 distances between the
# k_min-th and the k_max-th smallest (the interval average), so a few images with the same defect cannot hide it
import torch

from defectvad.components.nearest_neighbors import BLOCK_ELEMENTS, euclidean_dist
from defectvad.errors import DatasetError


def interval_bounds(count, topmin_min, topmin_max):
    # fractions of the count (values below 1) or counts, as the authors read them; at least one value is kept
    # (the authors' code averages nothing, NaN, below 5 images)
    k_min = int(count * topmin_min) if topmin_min < 1 else int(topmin_min)
    k_max = int(count * topmin_max) if topmin_max < 1 else int(topmin_max)
    k_min, k_max = sorted((k_min, k_max))
    k_max = min(max(k_max, k_min + 1), count)
    return min(k_min, k_max - 1), k_max


def nearest_patch_distances(features, block_elements=BLOCK_ELEMENTS):
    # (N, L, C) -> (N, L, N): Euclidean distance of each patch to the nearest patch of each image, taken
    # image block by image block so that at most block_elements distances are held at once
    images, patches, channels = features.shape
    nearest = features.new_empty(images, patches, images)
    references = max(1, min(images, block_elements // (patches * patches)))
    queries = max(1, block_elements // (references * patches * patches))
    for q in range(0, images, queries):
        query = features[q:q + queries]
        for r in range(0, images, references):
            bank = features[r:r + references]
            # torch.cdist's arithmetic (||x||^2 - 2xy + ||y||^2, clamped, square root) as a counted matmul
            distances = euclidean_dist(query.reshape(-1, channels), bank.reshape(-1, channels))
            distances = distances.reshape(query.shape[0], patches, bank.shape[0], patches)
            nearest[q:q + queries, :, r:r + references] = distances.amin(-1)
    return nearest


def mutual_scores(features, topmin_min=0.0, topmin_max=0.3, block_elements=BLOCK_ELEMENTS):
    # features (N, L, C) of one layer and one aggregation degree -> patch scores (N, L)
    images = features.shape[0]
    if images < 2:
        raise DatasetError(f"MuSc scores each image against the others of its set: it needs at least 2 images, "
                           f"got {images}")
    with torch.autocast(device_type=features.device.type, enabled=False):
        nearest = nearest_patch_distances(features.float(), block_elements)
    itself = torch.arange(images, device=features.device)
    nearest[itself, :, itself] = float("inf")
    k_min, k_max = interval_bounds(images - 1, topmin_min, topmin_max)
    smallest = nearest.topk(k_max, dim=-1, largest=False, sorted=True).values
    return smallest[..., k_min:].mean(-1)
