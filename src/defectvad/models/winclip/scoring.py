# src/defectvad/models/winclip/scoring.py
# WinCLIP's sliding windows and scores (anomalib's winclip/utils.py): window masks, the text softmax, harmonic
# aggregation of window scores onto patches, and the visual association with reference embeddings
import torch
from torch.nn import functional as F

from defectvad.errors import ConfigError


def make_masks(grid_size, kernel_size, stride=1):
    # (patches per window, windows): column m holds the row-major indices of the patches window m covers
    height, width = grid_size
    if height < kernel_size or width < kernel_size:
        raise ConfigError(f"a WinCLIP window of {kernel_size}x{kernel_size} patches does not fit the {height}x{width} "
                          f"patch grid; use a larger input (transform.image_size) or smaller model.scales")
    grid = torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width)
    return F.unfold(grid, kernel_size, stride=stride)[0].int()


def cosine_similarity(first, second):
    # (..., N, D) and (M, D) or (..., M, D) -> (..., N, M)
    return F.normalize(first, dim=-1) @ F.normalize(second, dim=-1).transpose(-2, -1)


def class_scores(embeddings, text_embeddings, temperature=1.0, target_class=None):
    # the paper's equation (1): softmax over the texts of the temperature-scaled cosine similarities
    scores = (cosine_similarity(embeddings, text_embeddings) / temperature).softmax(dim=-1)
    return scores if target_class is None else scores[..., target_class]


def harmonic_aggregation(window_scores, grid_size, masks):
    # (B, windows) -> (B, H, W): each patch gets the harmonic mean of the scores of the windows covering it
    height, width = grid_size
    # coverage (patches, windows): whether the window's mask lists the patch
    patches = torch.arange(height * width, device=masks.device).view(-1, 1, 1)
    coverage = (masks.unsqueeze(0) == patches).any(dim=1)
    # a zero score gives 1 / 0 = inf only where a window covers the patch, never times an uncovered zero
    inverse = torch.where(coverage, (1 / window_scores).unsqueeze(1), 0).sum(dim=-1)
    scores = coverage.sum(dim=1) / inverse
    return scores.reshape(-1, height, width).nan_to_num(posinf=0.0)


def visual_association_score(embeddings, reference_embeddings):
    # the paper's equation (4): half the cosine distance to the nearest reference embedding of any image
    references = reference_embeddings.reshape(-1, embeddings.shape[-1])
    return (1 - cosine_similarity(embeddings, references)).amin(dim=-1) / 2
