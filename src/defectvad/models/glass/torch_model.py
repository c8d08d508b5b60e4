# src/defectvad/models/glass/torch_model.py
import math

import torch
from torch import nn
from torch.nn import functional as F

from defectvad.backbones.feature_extractors import FeatureExtractor
from defectvad.backbones.registry import IMAGENET_MEAN, IMAGENET_STD, resolve_layers
from defectvad.components.patch_features import Aggregator, PatchMaker, Preprocessing, resize_patch_grid
from defectvad.components.perlin import PerlinAnomalyGenerator
from defectvad.components.textures import SyntheticTextures
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import TrainingError
from defectvad.models.glass.anomaly_map import RescaleSegmentor
from defectvad.models.glass.loss import FocalLoss
from defectvad.models.glass.networks import Discriminator, Projection


def project_to_ring(points, anchors, inner, outer):
    # moves each point along its ray from its anchor so that its distance lies in [inner, outer]
    offsets = points - anchors
    norms = torch.linalg.vector_norm(offsets, dim=1)
    scale = (torch.clamp(norms, inner, outer) / (norms + 1e-10)).view(-1, 1)
    return anchors + scale * offsets


class GlassModel(nn.Module):
    def __init__(self, textures=None, backbone="wide_resnet50_2", layers=None, weights_path=None,
                 pretrain_embed_dim=1536, target_embed_dim=1536, patchsize=3, patchstride=1, pre_trained=True,
                 pre_projection=1, discriminator_layers=2, discriminator_hidden=1024, step=20, svd=0,
                 gaussian_noise_std=0.015, radius_quantile=0.75, focal_loss_quantile_threshold=0.5, mining=True,
                 normalize_mean=None, normalize_std=None):
        super().__init__()
        self.backbone = backbone
        self.layers = resolve_layers(backbone, layers, (1, 2))
        self.pre_trained = pre_trained
        # local anomalies: a texture pasted into one or two Perlin-shaped regions of every training image
        self.augmentor = PerlinAnomalyGenerator(SyntheticTextures() if textures is None else textures,
                                                probability=1.0, blend_factor=(0.2, 1.0), dual_mask=True)
        # the augmentor works on pixels in [0, 1]: the statistics that undo the input's normalisation
        self.register_buffer("_img_mean", torch.tensor(normalize_mean or IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("_img_std", torch.tensor(normalize_std or IMAGENET_STD).view(1, 3, 1, 1))
        self.focal_loss = FocalLoss()
        self.bce_loss = nn.BCELoss()

        extractor = FeatureExtractor(backbone, self.layers, weights_path=weights_path, requires_grad=not pre_trained)
        self.forward_modules = nn.ModuleDict({
            "feature_aggregator": extractor,
            "preprocessing": Preprocessing(extractor.out_dims, pretrain_embed_dim, patchsize=patchsize),
            "preadapt_aggregator": Aggregator(target_embed_dim, len(self.layers) * pretrain_embed_dim),
        })
        self.target_embed_dimension = target_embed_dim
        self.pre_projection = pre_projection
        if pre_projection > 0:
            self.projection = Projection(target_embed_dim, target_embed_dim, pre_projection)
        self.discriminator = Discriminator(target_embed_dim, n_layers=discriminator_layers, hidden=discriminator_hidden)
        self.step = step
        self.svd = svd
        self.gaussian_noise_std = gaussian_noise_std
        self.radius_quantile = radius_quantile
        self.focal_loss_quantile_threshold = focal_loss_quantile_threshold
        self.mining = mining
        self.patch_maker = PatchMaker(patchsize, stride=patchstride)
        self.anomaly_segmentor = RescaleSegmentor()
        # the mean adapted feature of every patch position over the training set, set at each epoch's start;
        # training needs it, evaluation does not (not a buffer, as in anomalib)
        self.center = None

    def adapt(self, embeddings):
        return self.projection(embeddings) if self.pre_projection > 0 else embeddings

    @torch.no_grad()
    def calculate_center(self, loader, device):
        self.forward_modules.eval()
        total, count = None, 0
        for batch in loader:
            images = batch["image"].to(device)
            outputs = self.adapt(self.generate_embeddings(images, evaluation=True)[0])
            outputs = outputs.reshape(images.shape[0], -1, outputs.shape[-1]).sum(0)
            total = outputs if total is None else total + outputs
            count += images.shape[0]
        if total is None:
            raise TrainingError("GLASS cannot compute its feature center: the training loader yielded no batches")
        self.center = total / count

    def calculate_features(self, img, aug, evaluation=False):
        fake_feats, patch_shapes = self.generate_embeddings(aug, evaluation=evaluation)
        true_feats = self.generate_embeddings(img, evaluation=evaluation)[0]
        if self.pre_projection > 0:
            return self.projection(true_feats), self.projection(fake_feats), patch_shapes
        return true_feats.requires_grad_(True), fake_feats.requires_grad_(True), patch_shapes

    def generate_embeddings(self, images, evaluation=False):
        # one target_embed_dim vector per position of the first layer's grid: each layer's 3x3 patches on that
        # grid, averaged to pretrain_embed_dim values per layer, then the layers together to target_embed_dim
        extractor = self.forward_modules["feature_aggregator"]
        if not evaluation and not self.pre_trained:
            extractor.train()
            features = extractor(images)
        else:
            extractor.eval()
            with torch.no_grad():
                features = extractor(images)
        features = [features[layer] for layer in self.layers]
        features = [self.tokens_to_map(feature) if feature.dim() == 3 else feature for feature in features]
        patchified = [self.patch_maker.patchify(feature, return_spatial_info=True) for feature in features]
        patch_shapes = [grid for _, grid in patchified]
        patches = [patchified[0][0]] + [resize_patch_grid(p, grid, patch_shapes[0]) for p, grid in patchified[1:]]
        patches = [p.reshape(-1, *p.shape[-3:]) for p in patches]
        embeddings = self.forward_modules["preprocessing"](patches)
        return self.forward_modules["preadapt_aggregator"](embeddings), patch_shapes

    @staticmethod
    def tokens_to_map(tokens):
        batch, length, channels = tokens.shape
        side = int(math.sqrt(length))
        return tokens.reshape(batch, side, side, channels).permute(0, 3, 1, 2)

    @torch.no_grad()
    def calculate_anomaly_scores(self, images):
        embeddings, patch_shapes = self.generate_embeddings(images, evaluation=True)
        patch_scores = self.patch_maker.unpatch_scores(self.discriminator(self.adapt(embeddings)), images.shape[0])
        grid = patch_shapes[0]
        anomaly_map = self.anomaly_segmentor.convert_to_segmentation(
            patch_scores.reshape(images.shape[0], grid[0], grid[1]), images.shape[-2:])
        return self.patch_maker.compute_score(patch_scores), anomaly_map

    def gradient_ascent_step(self, gaus_feats, gaus_loss, center, true_feats, r_t, step):
        # a step of 0.001 along the normalised gradient that makes the noisy features look more normal to the
        # discriminator; every fifth step the features go back onto a ring: [r_t, 2 r_t] around the center
        # (svd=1, hypersphere) or [0.5, 1] around their own normal feature (svd=0, manifold)
        grad = torch.autograd.grad(gaus_loss, [gaus_feats])[0]
        grad = grad / (torch.linalg.vector_norm(grad, dim=1).view(-1, 1) + 1e-10)
        with torch.no_grad():
            gaus_feats.add_(0.001 * grad)
        if (step + 1) % 5 == 0:
            if self.svd == 1:
                return project_to_ring(gaus_feats, center, r_t, 2 * r_t)
            return project_to_ring(gaus_feats, true_feats, 0.5, 1.0)
        return gaus_feats

    def bce(self, scores, target):
        # binary cross-entropy on probabilities is refused under CUDA's autocast: always computed in fp32
        with torch.autocast(scores.device.type, enabled=False):
            scores = scores.float()
            return self.bce_loss(scores, torch.full_like(scores, target))

    def downsample_mask(self, mask, grid):
        # the pixel mask of the pasted textures -> one label per patch: max pooling, nearest where sizes do not fit
        if mask.shape[-2:] == tuple(grid):
            return mask
        pool = (mask.shape[2] // grid[0], mask.shape[3] // grid[1])
        if pool[0] >= 1 and pool[1] >= 1:
            mask = F.max_pool2d(mask.float(), kernel_size=pool)
        if mask.shape[-2:] != tuple(grid):
            mask = F.interpolate(mask.float(), size=tuple(grid), mode="nearest")
        return mask

    def forward(self, img):
        if not self.training:
            pred_score, anomaly_map = self.calculate_anomaly_scores(img)
            return InferenceBatch(pred_score=pred_score, anomaly_map=anomaly_map)
        if self.center is None:
            raise TrainingError("GLASS trains around its feature center: call calculate_center before training")

        aug_raw, mask_s = self.augmentor(img * self._img_std + self._img_mean)
        aug = (aug_raw - self._img_mean) / self._img_std
        true_feats, fake_feats, patch_shapes = self.calculate_features(img, aug)
        mask_s_gt = self.downsample_mask(mask_s, patch_shapes[0]).reshape(-1, 1)
        is_normal = mask_s_gt[:, 0] == 0
        is_anomalous = ~is_normal

        # global anomalies: Gaussian noise on the normal features, pushed by gradient ascent
        gaus_feats = true_feats + torch.randn_like(true_feats) * self.gaussian_noise_std
        center = self.center.repeat(img.shape[0], 1, 1).reshape(-1, self.center.shape[-1])
        true_points = torch.cat([fake_feats[is_normal], true_feats])
        c_t_points = torch.cat([center[is_normal], center])
        r_t = torch.quantile(torch.linalg.vector_norm(true_points - c_t_points, dim=1).float(), q=self.radius_quantile)
        r_t = r_t.unsqueeze(0)

        for step in range(self.step + 1):
            scores = self.discriminator(torch.cat([true_feats, gaus_feats]))
            true_scores, gaus_scores = scores[: len(true_feats)], scores[len(true_feats):]
            true_loss = self.bce(true_scores, 0.0)
            gaus_loss = self.bce(gaus_scores, 1.0)
            bce_loss = true_loss + gaus_loss
            if step == self.step or not self.mining:
                break
            gaus_feats = self.gradient_ascent_step(gaus_feats, gaus_loss, center, true_feats, r_t, step)

        if self.svd == 1:
            # hypersphere: the local anomalies' features kept [2 r_t, 4 r_t] from the center
            fake_feats[is_anomalous] = project_to_ring(fake_feats[is_anomalous], center[is_anomalous], 2 * r_t, 4 * r_t)
        fake_scores = self.discriminator(fake_feats)

        # focal loss on the local anomalies' patches, the harder half (focal_loss_quantile_threshold) only
        fake_scores_, mask_ = fake_scores, mask_s_gt
        if self.focal_loss_quantile_threshold > 0:
            fake_dist = (fake_scores - mask_s_gt) ** 2
            hard = fake_dist >= torch.quantile(fake_dist.float(), q=self.focal_loss_quantile_threshold)
            fake_scores_, mask_ = fake_scores[hard].unsqueeze(1), mask_s_gt[hard].unsqueeze(1)
        focal_loss = self.focal_loss(torch.cat([1 - fake_scores_, fake_scores_], dim=1), mask_)
        return {"loss": bce_loss + focal_loss, "true_loss": true_loss, "gaus_loss": gaus_loss,
                "bce_loss": bce_loss, "focal_loss": focal_loss}
