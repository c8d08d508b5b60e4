# tests/test_glass.py
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from defectvad.components.patch_features import PatchMaker, average_windows, resize_patch_grid
from defectvad.data.transforms import ImageTransform
from defectvad.errors import ConfigError, DatasetError
from defectvad.models.glass.loss import FocalLoss
from defectvad.models.glass.torch_model import GlassModel, project_to_ring
from defectvad.models.glass.trainer import GlassTrainer

pytestmark = pytest.mark.usefixtures("single_thread")

# the demo CNN with random weights and narrow features: the algorithm, not anomalib's widths
TINY = {"backbone": "efficientnet_lite0", "pretrain_embed_dim": 24, "target_embed_dim": 16,
        "discriminator_hidden": 12}


def make_model(**kwargs):
    torch.manual_seed(0)
    return GlassModel(**{**TINY, **kwargs})


def bce(p, target):
    return -(target * np.log(p) + (1 - target) * np.log(1 - p)).mean()


def test_focal_loss_matches_the_smoothed_formula():
    # GLASS feeds [1 - p, p] and the patch label; one-hot targets clamped to [1e-5, 1 - 1e-5], pt gets + 1e-5
    p = np.array([0.9, 0.2, 0.6, 0.05, 0.99])
    target = np.array([1, 0, 0, 1, 1])
    on = np.where(target == 1, p, 1 - p)
    pt = (1 - 1e-5) * on + 1e-5 * (1 - on) + 1e-5
    expected = np.mean(-((1 - pt) ** 2) * np.log(pt))
    scores = torch.tensor(p, dtype=torch.float32)[:, None]
    loss = FocalLoss()(torch.cat([1 - scores, scores], 1), torch.tensor(target, dtype=torch.float32)[:, None])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # a float alpha weighs class balance_index by alpha, the other by 1 - alpha
    weights = np.where(target == 0, 0.25, 0.75)
    weighted = FocalLoss(alpha=0.25)(torch.cat([1 - scores, scores], 1), torch.tensor(target)[:, None].float())
    assert weighted.item() == pytest.approx(np.mean(-weights * (1 - pt) ** 2 * np.log(pt)), rel=1e-5)


def test_training_loss_is_bce_on_normal_and_noised_features_plus_focal_on_the_harder_half():
    model = make_model(mining=False).train()
    images = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 8:40, 16:32] = 1
    augmented = images * (1 - mask) + 2.0 * mask
    model.augmentor.forward = lambda raw: ((augmented * model._img_std + model._img_mean), mask)
    model.calculate_center([{"image": images}], torch.device("cpu"))
    torch.manual_seed(7)
    losses = model(images)

    # the same pieces by hand: embeddings, the same noise draw, the discriminator in training mode
    with torch.no_grad():
        true = model.projection(model.generate_embeddings(images)[0])
        fake = model.projection(model.generate_embeddings(augmented)[0])
        torch.manual_seed(7)
        noised = true + 0.015 * torch.randn_like(true)
        scores = model.discriminator(torch.cat([true, noised]))[:, 0].double().numpy()
        fake_scores = model.discriminator(fake)[:, 0].double().numpy()
    labels = mask.reshape(2, 1, 8, 8, 8, 8).amax((3, 5)).reshape(-1).numpy()
    assert labels.sum() == 4 * 2
    n = len(true)
    expected_bce = bce(scores[:n], 0) + bce(scores[n:], 1)
    error = (fake_scores - labels) ** 2
    hard = error >= np.quantile(error, 0.5)
    on = np.where(labels[hard] == 1, fake_scores[hard], 1 - fake_scores[hard])
    pt = (1 - 1e-5) * on + 1e-5 * (1 - on) + 1e-5
    expected_focal = np.mean(-((1 - pt) ** 2) * np.log(pt))
    assert losses["bce_loss"].item() == pytest.approx(expected_bce, rel=1e-5)
    assert losses["true_loss"].item() == pytest.approx(bce(scores[:n], 0), rel=1e-5)
    assert losses["focal_loss"].item() == pytest.approx(expected_focal, rel=1e-4)
    assert losses["loss"].item() == pytest.approx(expected_bce + expected_focal, rel=1e-5)
    losses["loss"].backward()
    assert model.projection.layers[0].weight.grad.abs().sum() > 0


def test_ring_projection_keeps_direction_and_clamps_distance():
    torch.manual_seed(0)
    anchors = torch.randn(6, 5)
    directions = torch.nn.functional.normalize(torch.randn(6, 5), dim=1)
    lengths = torch.tensor([0.1, 0.5, 0.7, 1.0, 1.6, 3.0])
    moved = project_to_ring(anchors + lengths[:, None] * directions, anchors, 0.5, 1.0)
    offsets = moved - anchors
    assert torch.allclose(offsets.norm(dim=1), torch.tensor([0.5, 0.5, 0.7, 1.0, 1.0, 1.0]), atol=1e-5)
    assert torch.allclose(torch.nn.functional.normalize(offsets, dim=1), directions, atol=1e-5)


@pytest.mark.parametrize("svd", [0, 1])
def test_gradient_ascent_moves_by_0_001_and_projects_onto_the_ring_every_fifth_step(svd):
    model = make_model(svd=svd).train()
    torch.manual_seed(1)
    true = torch.randn(10, 16)
    center = true.mean(0, keepdim=True).expand(10, 16) + 0.1
    r_t = torch.tensor([0.8])

    def ascend(points, step):
        gaus_loss = model.bce_loss(model.discriminator(points), torch.ones(10, 1))
        return model.gradient_ascent_step(points, gaus_loss, center, true, r_t, step)

    start = true + torch.randn(10, 16) * 2.0
    plain = ascend(start.clone().requires_grad_(True), step=0)
    assert torch.allclose((plain - start).norm(dim=1), torch.full((10,), 0.001), atol=1e-5)
    projected = ascend(start.clone().requires_grad_(True), step=4)
    anchor, inner = (center, 0.8) if svd == 1 else (true, 0.5)
    distances = (projected - anchor).norm(dim=1)
    assert distances.min() >= inner - 1e-4 and distances.max() <= 2 * inner + 1e-4
    # the projection changes the length of each offset from the anchor, never its direction
    before = torch.nn.functional.normalize(plain.detach() - anchor, dim=1)
    assert torch.allclose(torch.nn.functional.normalize(projected.detach() - anchor, dim=1), before, atol=1e-5)
    # far points land on the outer radius
    assert torch.allclose(distances, torch.full((10,), 2.0 * inner), atol=1e-4)


class FixedScores(nn.Module):
    def __init__(self, scores):
        super().__init__()
        self.scores = scores

    def forward(self, x):
        return self.scores


def test_map_is_the_blurred_bilinear_upsampling_of_the_discriminator_scores():
    model = make_model().eval()
    grid = torch.rand(2, 8, 8) * 0.1
    grid[1, 2, 5] = 0.9
    model.discriminator = FixedScores(grid.reshape(-1, 1))
    output = model(torch.randn(2, 3, 64, 64))
    assert output.anomaly_map.shape == (2, 1, 64, 64)
    assert torch.allclose(output.pred_score, grid.flatten(1).amax(1))
    for index in range(2):
        # bilinear (half-pixel centres) by hand, then scipy's Gaussian filter (sigma 4, 33 taps, mirrored borders)
        source = (np.arange(64) + 0.5) / 8 - 0.5
        low = np.clip(np.floor(source).astype(int), 0, 7)
        high = np.clip(low + 1, 0, 7)
        weight = np.clip(source - np.floor(source), 0, 1) * (source > 0)
        rows = grid[index].numpy()[low] * (1 - weight)[:, None] + grid[index].numpy()[high] * weight[:, None]
        upsampled = rows[:, low] * (1 - weight)[None] + rows[:, high] * weight[None]
        expected = ndimage.gaussian_filter(upsampled.astype(np.float64), sigma=4, mode="mirror", truncate=4.0)
        assert np.abs(output.anomaly_map[index, 0].numpy() - expected).max() < 1e-5
    peak = output.anomaly_map[1, 0].argmax().item()
    assert abs(peak // 64 - 2.5 * 8) <= 4 and abs(peak % 64 - 5.5 * 8) <= 4


def test_patch_maker_and_grid_resizing():
    features = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    patches, grid = PatchMaker(3, stride=1).patchify(features, return_spatial_info=True)
    assert grid == (4, 5) and patches.shape == (2, 20, 3, 3, 3)
    # patch 6 is row 1, column 1: its 3x3 neighbourhood; patch 0 is zero-padded at the top left
    assert torch.equal(patches[1, 6], features[1, :, 0:3, 0:3])
    assert torch.equal(patches[0, 0, :, 0, :], torch.zeros(3, 3)) and torch.equal(patches[0, 0, :, 1:, 1:],
                                                                                  features[0, :, 0:2, 0:2])
    resized = resize_patch_grid(patches, grid, (8, 10))
    expected = torch.nn.functional.interpolate(features, size=(8, 10), mode="bilinear")
    # the centre value of each patch follows the feature map's own bilinear resize
    assert torch.allclose(resized[:, :, :, 1, 1].reshape(2, 8, 10, 3).permute(0, 3, 1, 2), expected, atol=1e-5)
    assert torch.equal(PatchMaker.compute_score(torch.tensor([[[0.1], [0.7]], [[0.3], [0.2]]])),
                       torch.tensor([0.7, 0.3]))


@pytest.mark.parametrize("length, size", [(360, 1536), (9216, 1536), (100, 7), (20, 13)])
def test_exported_pooling_averages_the_windows_of_adaptive_pooling(length, size):
    # ONNX has no adaptive pooling: the export gathers the same windows
    features = torch.randn(3, length)
    index, weight = average_windows(length, size)
    expected = np.stack([[row[(i * length) // size: -(-(i + 1) * length // size)].mean() for i in range(size)]
                         for row in features.double().numpy()])
    assert np.abs((features[:, index] * weight).sum(-1).numpy() - expected).max() < 1e-5
    assert torch.allclose(torch.nn.functional.adaptive_avg_pool1d(features[:, None], size)[:, 0],
                          torch.from_numpy(expected).float(), atol=1e-5)


def test_state_dict_names_and_shapes_are_anomalib_s():
    model = GlassModel(backbone="efficientnet_lite0")
    state = model.state_dict()
    own = {key: tuple(value.shape) for key, value in state.items()
           if not key.startswith("forward_modules.feature_aggregator.")}
    assert own == {
        "_img_mean": (1, 3, 1, 1), "_img_std": (1, 3, 1, 1),
        "projection.layers.0fc.weight": (1536, 1536), "projection.layers.0fc.bias": (1536,),
        "discriminator.body.block1.0.weight": (1024, 1536), "discriminator.body.block1.0.bias": (1024,),
        "discriminator.body.block1.1.weight": (1024,), "discriminator.body.block1.1.bias": (1024,),
        "discriminator.body.block1.1.running_mean": (1024,), "discriminator.body.block1.1.running_var": (1024,),
        "discriminator.body.block1.1.num_batches_tracked": (),
        "discriminator.tail.0.weight": (1, 1024), "anomaly_segmentor._kernel": (1, 1, 33, 33),
    }
    assert "forward_modules.feature_aggregator.feature_extractor._conv_stem.weight" in state
    assert torch.allclose(state["_img_mean"].flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert state["anomaly_segmentor._kernel"].sum().item() == pytest.approx(1.0)
    # hidden=None: the width shrinks by 1.5 per block, as anomalib's
    narrow = GlassModel(backbone="efficientnet_lite0", target_embed_dim=30, discriminator_layers=3,
                        discriminator_hidden=None, pre_projection=0)
    widths = [module.out_features for module in narrow.discriminator.modules() if isinstance(module, nn.Linear)]
    assert widths == [20, 13, 1] and not hasattr(narrow, "projection")


def test_optimizers_normalisation_and_summary_follow_anomalib(tmp_path):
    trainer = GlassTrainer(anomaly_source="synthetic", **TINY)
    assert trainer.trainer_arguments == {"max_epochs": 100, "gradient_clip_val": 0}
    group = trainer.configure_optimizers()
    discriminator, projection = group.optimizers
    assert isinstance(discriminator, torch.optim.AdamW) and discriminator.param_groups[0]["lr"] == 0.0002
    assert type(projection) is torch.optim.Adam and projection.param_groups[0]["lr"] == 0.0001
    assert projection.param_groups[0]["weight_decay"] == 1e-5
    assert len(group.param_groups) == 2
    trained = GlassTrainer(anomaly_source="synthetic", pre_trained=False, **TINY).configure_optimizers()
    assert len(trained.optimizers) == 3 and isinstance(trained.optimizers[2], torch.optim.AdamW)

    class Images:
        transform = ImageTransform(normalize=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.1, 0.3))
    trainer.match_normalization(Images())
    assert torch.allclose(trainer.model._img_std.flatten(), torch.tensor([0.2, 0.1, 0.3]))
    Images.transform = ImageTransform(normalize=False)
    trainer.match_normalization(Images())
    assert trainer.model._img_mean.abs().sum() == 0 and torch.all(trainer.model._img_std == 1)
    summary = trainer.summary()
    assert summary["anomaly_source"] == "synthetic" and summary["anomaly_source_path"] is None
    assert summary["textures"] == "generated: perlin, stripes, checker" and summary["svd"] == 0

    with pytest.raises(DatasetError, match="GLASS's anomaly textures were not found.*model.anomaly_source=synthetic"):
        GlassTrainer(anomaly_source_path=tmp_path / "dtd", **TINY)
    with pytest.raises(ConfigError, match="model.svd must be 0"):
        GlassTrainer(anomaly_source="synthetic", svd=2, **TINY)


def test_one_fit_learns_to_flag_pasted_textures():
    # two epochs on eight 64x64 images: the discriminator tells normal patches from pasted ones
    torch.manual_seed(0)
    trainer = GlassTrainer(anomaly_source="synthetic", step=5, **TINY).configure_engine(max_epochs=2)
    stripes = (torch.arange(64) // 8 % 2).float().expand(3, 64, 64)
    images = [{"image": stripes + 0.05 * torch.randn(3, 64, 64), "label": 0, "mask": torch.zeros(1, 64, 64),
               "image_path": f"{i}.png"} for i in range(8)]
    loader = torch.utils.data.DataLoader(images, batch_size=4)
    trainer.fit(loader)
    assert len(trainer.train_losses) == 2 and all(math.isfinite(value) for value in trainer.train_losses)
    assert trainer.model.center.shape == (64, 16)
    trainer.model.eval()
    with torch.no_grad():
        normal = trainer.model(images[0]["image"][None])
        defect = images[0]["image"].clone()
        defect[:, 16:40, 16:40] = torch.rand(3, 24, 24) * 3
        anomalous = trainer.model(defect[None])
    assert anomalous.pred_score.item() > normal.pred_score.item()
