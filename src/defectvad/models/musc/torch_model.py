# src/defectvad/models/musc/torch_model.py
# MuSc (Li et al., ICLR 2024) after the authors' code (xrli-U/MuSc): zero-shot and batch-level. A set of
# unlabeled images is scored as a whole: the patch tokens of a few ViT blocks are aggregated over r x r
# neighbourhoods (LNAMD, one feature set per r), each patch is scored against all the other images of the set
# (MSM), the maps are the mean over blocks and degrees, and the image scores (each map's maximum) are re-scored
# over class-token neighbourhoods (RsCIN). forward(images) scores the images it is given as one set; the
# trainer gives it the whole test set (embed every batch, then score_set once)
import torch
from torch import nn
from torch.nn import functional as F

from defectvad.backbones.registry import resolve_layers
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError
from defectvad.models.musc.backbones import block_indices, build_tower, check_backbone, extract_tokens
from defectvad.models.musc.lnamd import aggregate_neighbourhood
from defectvad.models.musc.msm import mutual_scores
from defectvad.models.musc.rscin import rescore_images

BACKBONE = "clip_vit_l14_336"


class MuscModel(nn.Module):
    # one forward scores its images as a set (metrics/efficiency.py times a set, per image)
    batch_level = True

    def __init__(self, backbone=BACKBONE, layers=None, weights_path=None, r_list=(1, 3, 5), k_list=(1, 2, 3),
                 topmin_min=0.0, topmin_max=0.3, clip_architecture=None, quick_gelu=None):
        super().__init__()
        if not r_list or not all(isinstance(r, int) and r >= 1 and r % 2 for r in r_list):
            raise ConfigError(f"model.r_list must hold odd aggregation degrees >= 1 (the authors': 1, 3, 5), "
                              f"got {r_list!r}")
        if k_list and not all(isinstance(k, int) and k >= 0 for k in k_list):
            raise ConfigError(f"model.k_list must hold neighbourhood sizes >= 1 ([0] or null: no RsCIN), got {k_list!r}")
        if not 0 <= topmin_min <= topmin_max:
            raise ConfigError(f"model.topmin_min and model.topmin_max must satisfy 0 <= min <= max, got "
                              f"{topmin_min} and {topmin_max}")
        check_backbone(backbone)
        self.backbone = backbone
        self.layers = resolve_layers(backbone, layers, (0, 1, 2, 3))
        self.indices = block_indices(backbone, self.layers)
        self.r_list = tuple(r_list)
        self.k_list = tuple(k_list or ())
        self.topmin_min = topmin_min
        self.topmin_max = topmin_max
        self.feature_extractor = build_tower(backbone, weights_path, clip_architecture, quick_gelu)

    @torch.no_grad()
    def embed(self, images):
        # -> {"patches": [(B, L, C) per layer], "class_tokens": (B, D), "grid": (h, w)}
        self.feature_extractor.eval()
        patches, class_tokens, grid = extract_tokens(self.feature_extractor, images, self.indices)
        return {"patches": patches, "class_tokens": class_tokens, "grid": grid}

    @torch.no_grad()
    def score_patches(self, patches, grid):
        # [(N, L, C) per layer] -> (N, L): the mean of the mutual scores over aggregation degrees and layers
        total = 0
        for r in self.r_list:
            for layer_patches in patches:
                features = aggregate_neighbourhood(layer_patches.float(), grid, r)
                total = total + mutual_scores(features, self.topmin_min, self.topmin_max).double()
        return (total / (len(self.r_list) * len(patches))).float()

    @torch.no_grad()
    def score_set(self, embedding, image_size):
        grid = embedding["grid"]
        patch_scores = self.score_patches(embedding["patches"], grid)
        anomaly_map = F.interpolate(patch_scores.reshape(-1, 1, *grid), size=tuple(image_size), mode="bilinear",
                                    align_corners=True)
        max_scores = anomaly_map.flatten(1).amax(1)
        pred_score = rescore_images(max_scores, embedding["class_tokens"], self.k_list)
        return InferenceBatch(pred_score.float(), anomaly_map,
                              {"patch_scores": patch_scores, "max_score": max_scores})

    def forward(self, images):
        return self.score_set(self.embed(images), images.shape[-2:])
