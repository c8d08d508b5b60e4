# tests/test_anomaly_dino.py
import copy
import math

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from defectvad.errors import ConfigError
from defectvad.models.anomaly_dino.torch_model import AnomalyDINOModel
from defectvad.models.anomaly_dino.trainer import AnomalyDINOTrainer
from fakes import StripesDataset

pytestmark = pytest.mark.usefixtures("single_thread")


def hand_blur(maps, sigma=4.0):
    # separable Gaussian, kernel 2 * int(4 sigma + 0.5) + 1, reflected borders
    size = 2 * int(4 * sigma + 0.5) + 1
    x = torch.arange(size, dtype=torch.float64) - size // 2
    kernel = torch.exp(-x**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    maps = F.pad(maps, (size // 2,) * 4, mode="reflect")
    maps = F.conv2d(maps, kernel.view(1, 1, 1, -1))
    return F.conv2d(maps, kernel.view(1, 1, -1, 1))


@pytest.fixture(scope="module")
def dinov2_trainer():
    # built once (a ViT-S/14 takes seconds to initialise), copied by each test
    torch.manual_seed(0)
    trainer = AnomalyDINOTrainer(backbone="dinov2_vits14").configure_engine(progress_bar=False)
    # random blocks that matter: layer scales near 1 rather than DINOv2's 1e-5
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if name.endswith("gamma"):
                parameter.uniform_(0.3, 1.0)
    return trainer


def with_settings(trainer, **settings):
    trainer = copy.deepcopy(trainer)
    for key, value in settings.items():
        setattr(trainer.model, key, value)
    return trainer


def test_scores_are_the_cosine_distance_to_the_nearest_reference_patches(dinov2_trainer):
    trainer = with_settings(dinov2_trainer, num_neighbours=2)
    model = trainer.model
    # 72 x 60 is cropped to whole 14-pixel patches, 70 x 56: a 5 x 4 grid, so the top 1% is the largest patch
    references = StripesDataset(2, seed=1, size=60)
    tests = StripesDataset(2, anomalous_every=2, seed=2, size=60)
    pad = lambda image: F.pad(image, (0, 0, 6, 6), mode="reflect")  # noqa: E731
    reference_images = torch.stack([pad(item["image"]) for item in references])
    images = torch.stack([pad(item["image"]) for item in tests])
    assert images.shape[-2:] == (72, 60)
    model.train()
    model(reference_images)
    model.fit()
    model.eval()
    outputs = model(images)

    with torch.no_grad():
        bank = model.feature_encoder.tokens(reference_images[:, :, 1:71, 2:58])["norm"]["patches"]
        queries = model.feature_encoder.tokens(images[:, :, 1:71, 2:58])["norm"]["patches"]
    assert queries.shape == (2, 20, 384) and model.memory_bank.shape == (40, 384)
    bank = bank.reshape(-1, 384).double()
    bank = bank / bank.norm(dim=1, keepdim=True)
    queries = queries.double() / queries.double().norm(dim=-1, keepdim=True)
    # cosine distance of unit vectors: half the squared Euclidean distance
    distances = torch.stack([torch.cdist(query, bank).pow(2) / 2 for query in queries])
    patch_scores = distances.sort(-1).values[..., :2].mean(-1)
    expected_score = patch_scores.amax(-1)
    torch.testing.assert_close(outputs.pred_score.double(), expected_score, rtol=1e-4, atol=1e-6)

    grid = patch_scores.reshape(2, 1, 5, 4).repeat_interleave(14, 2).repeat_interleave(14, 3)
    expected_map = F.pad(hand_blur(grid), (2, 2, 1, 1), mode="replicate")
    assert outputs.anomaly_map.shape == (2, 1, 72, 60)
    torch.testing.assert_close(outputs.anomaly_map.double(), expected_map, rtol=1e-4, atol=1e-6)
    # a reference image is its own nearest neighbour for every patch: the 2-neighbour mean keeps only the second
    own = model(reference_images[:1]).pred_score
    assert 0 < float(own) < float(outputs.pred_score.min())


def hand_features(foreground, scale=40.0):
    # a foreground patch is scale * e1, the rest 0: the first principal component is e1, known by hand
    features = torch.zeros(foreground.numel(), 6)
    features[foreground.flatten(), 0] = scale
    return features


def test_background_mask_on_a_hand_made_grid():
    # 12 x 12 patches, foreground rows 3-7 and columns 3-8 with a hole at (5, 5): 29 of the centre's 49 patches
    # (rows and columns 2-8), above the 35% that keeps the component's sign
    foreground = torch.zeros(12, 12, dtype=torch.bool)
    foreground[3:8, 3:9] = True
    foreground[5, 5] = False
    features = torch.stack([hand_features(foreground), -hand_features(foreground)])
    masks = AnomalyDINOModel.compute_background_masks(features, (12, 12))
    # dilated once (rows 2-8, columns 2-9, the hole filled), then closed, which leaves that rectangle
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[2:9, 2:10] = True
    assert masks.shape == (2, 144)
    assert torch.equal(masks[0].reshape(12, 12), expected)
    # negated features: the component points the other way, the centre holds none of the thresholded side,
    # and the sign flips back to the same mask
    assert torch.equal(masks[1].reshape(12, 12), expected)

    # foreground on the top two rows only: the centre holds none of it, so the other side is taken, whose
    # projection (-40 * 24 / 144 = -6.7) stays under the threshold of 10: nothing is foreground
    border = torch.zeros(12, 12, dtype=torch.bool)
    border[:2] = True
    assert not AnomalyDINOModel.compute_background_masks(hand_features(border)[None], (12, 12)).any()


def test_masked_patches_stay_out_of_the_bank_and_score_zero(dinov2_trainer, monkeypatch):
    # the mask: the left half of the 4 x 4 grid of a 56 x 56 input
    def left_half(batch_features, grid_size):
        mask = torch.zeros(batch_features.shape[0], *grid_size, dtype=torch.bool)
        mask[..., : grid_size[1] // 2] = True
        return mask.flatten(1)

    monkeypatch.setattr(AnomalyDINOModel, "compute_background_masks", staticmethod(left_half))
    trainer = with_settings(dinov2_trainer, masking=True)
    model = trainer.model
    references = torch.stack([item["image"] for item in StripesDataset(3, seed=1, size=56)])
    tests = torch.stack([item["image"] for item in StripesDataset(2, anomalous_every=1, seed=3, size=56)])
    model.train()
    model(references)
    model.fit()
    model.eval()
    outputs = model(tests)
    assert model.memory_bank.shape == (3 * 8, 384)
    with torch.no_grad():
        bank = model.feature_encoder.tokens(references)["norm"]["patches"].reshape(3, 4, 4, 384)[:, :, :2]
        queries = model.feature_encoder.tokens(tests)["norm"]["patches"]
    bank = F.normalize(bank.reshape(-1, 384).double(), dim=1)
    similarity = F.normalize(queries.double(), dim=-1) @ bank.T
    nearest = (1 - similarity.amax(-1)).reshape(2, 4, 4)
    nearest[..., 2:] = 0
    # 16 patches: the top 1% is the single largest
    torch.testing.assert_close(outputs.pred_score.double(), nearest.flatten(1).amax(1), rtol=1e-4, atol=1e-6)


def test_coreset_learning_types_and_backbones(dinov2_trainer):
    trainer = with_settings(dinov2_trainer, coreset_subsampling=True, sampling_ratio=0.25)
    assert (trainer.learning_type, trainer.default_k_shot, trainer.exportable) == ("few_shot", 1, True)
    trainer.fit(DataLoader(StripesDataset(2, seed=1, size=56), batch_size=2))
    # 2 images x 16 patches, a quarter kept; the bank rows are unit vectors
    assert trainer.model.memory_bank.shape == (8, 384)
    torch.testing.assert_close(trainer.model.memory_bank.norm(dim=1), torch.ones(8))
    assert trainer.summary()["memory_bank_size"] == [8, 384]
    # anomalib reads the last block through the final norm, and resamples positions as its patched timm does
    network = trainer.model.feature_encoder.feature_extractor
    assert (trainer.model.layer, trainer.model.patch_size, network.pos_embed_rule) == ("norm", 14, "timm_no_antialias")

    full = AnomalyDINOTrainer(backbone="resnet18", learning_type="one_class")
    assert (full.learning_type, full.model.layer, full.model.patch_size) == ("one_class", "layer4", 32)
    # the PCA of the background mask has no ONNX operator
    assert not AnomalyDINOTrainer(backbone="resnet18", masking=True).exportable
    with pytest.raises(ConfigError, match="few_shot, one_class"):
        AnomalyDINOTrainer(backbone="resnet18", learning_type="zero_shot")
    with pytest.raises(ConfigError, match="num_neighbours"):
        AnomalyDINOTrainer(backbone="resnet18", num_neighbours=0)
    # the image score: the mean of the top 1% of the patch scores (3 of 300)
    assert math.isclose(AnomalyDINOModel.mean_top1p(torch.arange(300.0)[None]).item(), 298.0)
