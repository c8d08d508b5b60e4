# tests/test_musc.py
import math

import pytest
import torch
from torch.utils.data import DataLoader

from defectvad.errors import ConfigError, DatasetError
from defectvad.metrics.efficiency import measure_efficiency
from defectvad.models.musc.lnamd import aggregate_neighbourhood
from defectvad.models.musc.msm import interval_bounds, mutual_scores
from defectvad.models.musc.rscin import rescore_images
from defectvad.models.musc.trainer import MuscTrainer

TINY_CLIP = dict(embed_dim=16, image_size=42, vision_width=32, vision_layers=2, vision_head_width=16)
TINY_LAYERS = ["transformer.resblocks.0", "transformer.resblocks.1"]


def brute_force_scores(features, k_min, k_max):
    # every patch, every other image, every patch of it: plain loops in float64
    features = features.double()
    images, patches, _ = features.shape
    scores = torch.zeros(images, patches, dtype=torch.float64)
    for i in range(images):
        for p in range(patches):
            nearest = []
            for j in range(images):
                if j == i:
                    continue
                nearest.append(min(math.sqrt(float(((features[i, p] - features[j, q]) ** 2).sum()))
                                   for q in range(patches)))
            nearest.sort()
            scores[i, p] = sum(nearest[k_min:k_max]) / (k_max - k_min)
    return scores


@pytest.mark.parametrize("block_elements", [2**24, 36])
def test_mutual_scores_are_the_interval_average_of_the_distances_to_the_other_images(block_elements):
    torch.manual_seed(0)
    features = torch.randn(11, 6, 5)
    # 10 other images: the 2nd to the 5th smallest distances are averaged
    assert interval_bounds(10, 0.1, 0.5) == (1, 5)
    found = mutual_scores(features, 0.1, 0.5, block_elements=block_elements)
    torch.testing.assert_close(found.double(), brute_force_scores(features, 1, 5), rtol=1e-5, atol=1e-6)


def test_mutual_scores_keep_one_distance_for_small_sets_and_need_two_images():
    # the authors' 30 % of 3 other images is none (their code: NaN); the nearest image is kept
    assert interval_bounds(3, 0.0, 0.3) == (0, 1)
    assert interval_bounds(199, 0.0, 0.3) == (0, 59)
    features = torch.randn(4, 3, 2)
    torch.testing.assert_close(mutual_scores(features).double(), brute_force_scores(features, 0, 1), rtol=1e-5,
                               atol=1e-6)
    with pytest.raises(DatasetError, match="at least 2 images"):
        mutual_scores(features[:1])


def direct_aggregation(patches, grid, r):
    # layer norm over the whole map by its formula, then each neighbourhood summed by hand over r * r cells
    batch, _, channels = patches.shape
    height, width = grid
    x = patches.double().transpose(1, 2).reshape(batch, channels, height, width)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) / torch.sqrt(variance + 1e-5)
    out = torch.zeros_like(x)
    half = (r - 1) // 2
    for row in range(height):
        for col in range(width):
            for dr in range(-half, half + 1):
                for dc in range(-half, half + 1):
                    if 0 <= row + dr < height and 0 <= col + dc < width:
                        out[:, :, row, col] += x[:, :, row + dr, col + dc]
    out = (out / (r * r)).flatten(2).transpose(1, 2)
    return out / out.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("r", [1, 3, 5])
def test_lnamd_is_the_zero_padded_neighbourhood_mean_of_the_layer_normalised_map(r):
    torch.manual_seed(1)
    patches = torch.randn(2, 4 * 5, 3) * 2 + 1
    found = aggregate_neighbourhood(patches, (4, 5), r)
    torch.testing.assert_close(found.double(), direct_aggregation(patches, (4, 5), r), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(found.norm(dim=-1), torch.ones(2, 20))


def test_rscin_averages_the_scaled_scores_over_the_most_similar_images():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0])
    tokens = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    # scaled scores 0, .25, .5, 1; k=1 keeps each image alone; k=2 adds its most similar other image, weighted by
    # the dot products (row 0: 1 and .8 for images 0 and 1; row 1: 1 and .96 for images 1 and 3; ...)
    k2 = torch.tensor([0.8 * 0.25 / 1.8, (0.25 + 0.96) / 1.96, (0.5 + 0.8) / 1.8, (1 + 0.96 * 0.25) / 1.96])
    expected = (torch.tensor([0.0, 0.25, 0.5, 1.0]) + k2) / 2
    torch.testing.assert_close(rescore_images(scores, tokens, (1, 2)), expected)
    torch.testing.assert_close(rescore_images(scores, tokens, (2,)), k2)
    assert rescore_images(scores, tokens, (0,)) is scores


def tiny_trainer(**settings):
    torch.manual_seed(0)
    return MuscTrainer(backbone="clip_vit_l14_336", layers=TINY_LAYERS, clip_architecture=TINY_CLIP, **settings)


def items(count, size=42):
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(count, 3, size, size, generator=generator)
    images[0, :, 10:25, 10:25] += 4
    return [{"image": image, "label": int(index == 0), "mask": torch.zeros(1, size, size),
             "image_path": f"image_{index}.png"} for index, image in enumerate(images)]


def test_predict_scores_the_whole_loader_as_one_set():
    trainer = tiny_trainer()
    data = items(6)
    images = torch.stack([item["image"] for item in data])
    predictions = trainer.predict(DataLoader(data, batch_size=2))
    whole = trainer.model(images)
    torch.testing.assert_close(predictions["pred_score"], whole.pred_score)
    torch.testing.assert_close(predictions["anomaly_map"], whole.anomaly_map)
    assert predictions["image_path"] == [item["image_path"] for item in data]
    # one batch of two scored alone is another set, with other scores
    assert not torch.allclose(trainer.model(images[:2]).anomaly_map, whole.anomaly_map[:2])
    # the map is the patch grid (3 x 3) stretched with its corners kept; the image's raw score is its maximum
    patch_scores = whole.extras["patch_scores"].reshape(6, 3, 3)
    torch.testing.assert_close(whole.anomaly_map[:, 0, 0, 0], patch_scores[:, 0, 0])
    torch.testing.assert_close(whole.anomaly_map[:, 0, -1, -1], patch_scores[:, -1, -1])
    torch.testing.assert_close(whole.extras["max_score"], whole.anomaly_map.flatten(1).amax(1))


def test_efficiency_times_a_set_per_image_and_settings_are_checked():
    trainer = tiny_trainer(r_list=(1,), k_list=(1,))
    figures = measure_efficiency(trainer.model, torch.stack([item["image"] for item in items(3)]),
                                 torch.device("cpu"), warmup=0, latency_repeats=1, batch_size=4, throughput_repeats=1)
    assert figures["latency"]["batch_size"] == 4
    assert figures["latency_ms"] > 0 and figures["throughput_images_per_s"] > 0
    # the set's distances are matrix products: 4 images of 9 patches against each other, 2 layers, per image
    assert figures["flops_per_image"] >= 2 * 2 * 9 * 9 * 4 * 32
    for settings in ({"r_list": (2,)}, {"topmin_min": 0.5, "topmin_max": 0.3}):
        with pytest.raises(ConfigError):
            tiny_trainer(**settings)
    with pytest.raises(ConfigError, match="CLIP or DINOv2"):
        MuscTrainer(backbone="resnet18")
