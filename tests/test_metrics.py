# tests/test_metrics.py
import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from defectvad.metrics import sweep
from defectvad.metrics.aupro import aupro, label_regions
from defectvad.metrics.auroc import auroc
from defectvad.metrics.average_precision import average_precision
from defectvad.metrics.evaluation import compute_metrics
from defectvad.metrics.f1_max import f1_max, f1_max_threshold


def sklearn_f1_max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision), where=precision + recall > 0)
    return f1.max()


def f1_at(labels, scores, threshold):
    predicted = scores >= threshold
    tp = np.sum(predicted & (labels == 1))
    return 2 * tp / (predicted.sum() + labels.sum())


def random_scores(seed, n, ties, dtype):
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    scores = rng.normal(size=n) + labels
    if ties:
        scores = np.round(scores, 1)
    return scores.astype(dtype), labels


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curve_metrics_match_sklearn(seed, dtype, ties):
    scores, labels = random_scores(seed, 2000, ties, dtype)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    f1, threshold = f1_max_threshold(scores, labels)
    assert f1 == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12)
    assert f1_at(labels, scores, threshold) == pytest.approx(f1, abs=1e-12)
    assert f1_max(scores, labels) == f1


def test_ties_across_chunk_boundaries(monkeypatch):
    scores, labels = random_scores(3, 500, True, np.float32)
    expected = (auroc(scores, labels), average_precision(scores, labels), f1_max_threshold(scores, labels))
    monkeypatch.setattr(sweep, "CHUNK", 7)
    chunked = (auroc(scores, labels), average_precision(scores, labels), f1_max_threshold(scores, labels))
    assert chunked[0] == pytest.approx(expected[0], abs=1e-12)
    assert chunked[1] == pytest.approx(expected[1], abs=1e-12)
    assert chunked[2] == pytest.approx(expected[2], abs=1e-12)
    assert expected[0] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_signed_zeros_and_infinities_tie_like_sklearn():
    scores = np.array([0.0, -0.0, 0.0, -0.0, 1.0, -1.0, np.inf, -np.inf], np.float32)
    labels = np.array([1, 0, 0, 1, 1, 0, 1, 0])
    finite = np.clip(scores, -3e38, 3e38)  # sklearn refuses infinities; same order
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, finite), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, finite), abs=1e-12)
    assert f1_max(scores, labels) == pytest.approx(sklearn_f1_max(labels, finite), abs=1e-12)


def test_torch_inputs_equal_numpy_inputs():
    scores, labels = random_scores(4, 300, True, np.float32)
    assert auroc(torch.from_numpy(scores), torch.from_numpy(labels)) == auroc(scores, labels)
    half = torch.from_numpy(scores).to(torch.bfloat16)
    assert auroc(half, labels) == pytest.approx(roc_auc_score(labels, half.float().numpy()), abs=1e-12)


def test_single_class_gives_nan():
    scores = np.array([0.1, 0.5, 0.2])
    for labels in (np.zeros(3), np.ones(3)):
        assert math.isnan(auroc(scores, labels))
        assert math.isnan(average_precision(scores, labels))
        assert math.isnan(f1_max(scores, labels))
    maps = np.random.default_rng(0).random((2, 8, 8))
    assert math.isnan(aupro(maps, np.zeros((2, 8, 8))))
    metrics = compute_metrics(scores, np.zeros(3), maps, np.zeros((2, 8, 8)))
    assert all(math.isnan(metrics[key]) for key in metrics)


def test_nan_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        auroc(np.array([0.1, np.nan]), np.array([0, 1]))


def make_masks():
    masks = np.zeros((6, 16, 16), bool)
    masks[0, 2:6, 3:9] = True  # rectangle
    masks[1, 2:10, 2:4] = True  # L shape
    masks[1, 8:10, 2:9] = True
    masks[2, 1:4, 1:4] = True  # two regions in one image
    masks[2, 9:14, 8:15] = True
    masks[4, 5:7, 5:7] = True  # two squares touching at a corner: one 8-connected region
    masks[4, 7:9, 7:9] = True
    return masks  # images 3 and 5 are defect-free


def make_maps(masks, seed, ties):
    rng = np.random.default_rng(seed)
    maps = rng.random(masks.shape) + 0.6 * masks * rng.random(masks.shape)
    if ties:
        maps = np.round(maps, 2)
    return maps.astype(np.float32)


def reference_aupro(maps, masks, fpr_limit=0.3):
    regions = []
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(index, labelled == k) for k in range(1, count + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fpr = (predicted & normal).sum() / normal.sum()
        pro = np.mean([predicted[index][region].mean() for index, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (f0, p0), (f1, p1) in zip(points, points[1:]):
        if f1 <= fpr_limit:
            area += (f1 - f0) * (p0 + p1) / 2
        elif f0 < fpr_limit:
            p_limit = p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0)
            area += (fpr_limit - f0) * (p0 + p_limit) / 2
    return area / fpr_limit


def test_regions_are_8_connected_within_each_image():
    masks = make_masks()
    regions, weights = label_regions(masks)
    assert regions.max() == 5
    assert len(np.unique(regions[2])) == 3  # background and two regions
    assert len(np.unique(regions[4])) == 2  # background and one region
    assert weights[regions[0, 2, 3]] == pytest.approx(1 / (5 * 24))
    assert np.sum(weights[regions]) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference(seed, ties, fpr_limit):
    masks = make_masks()
    maps = make_maps(masks, seed, ties)
    expected = reference_aupro(maps, masks, fpr_limit)
    assert 0 < expected < 1
    assert aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-6)


def test_aupro_across_chunk_boundaries(monkeypatch):
    masks = make_masks()
    maps = make_maps(masks, 5, True)
    monkeypatch.setattr(sweep, "CHUNK", 13)
    assert aupro(torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None].float()) == pytest.approx(
        reference_aupro(maps, masks), abs=1e-6
    )


def test_perfect_predictions_score_one():
    masks = make_masks()
    maps = masks + 0.1 * np.random.default_rng(0).random(masks.shape)
    labels = masks.any(axis=(1, 2)).astype(int)
    metrics = compute_metrics(labels + 0.5, labels, maps, masks)
    for key in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro", "mad"):
        assert metrics[key] == pytest.approx(1.0, abs=1e-12)
    assert metrics["image_f1_threshold"] == 1.5
    assert metrics["pixel_f1_threshold"] == pytest.approx(maps[masks].min())
    assert aupro(maps, masks) == pytest.approx(1.0, abs=1e-12)


def test_compute_metrics_matches_single_metrics():
    masks = make_masks()
    maps = make_maps(masks, 7, True)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    metrics = compute_metrics(scores, labels, maps, masks)
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert metrics["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert metrics["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert metrics["pixel_f1max"] == pytest.approx(sklearn_f1_max(masks.ravel(), maps.ravel()), abs=1e-12)
    assert metrics["aupro"] == pytest.approx(reference_aupro(maps, masks), abs=1e-6)
    seven = [metrics[key] for key in ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro")]
    assert metrics["mad"] == pytest.approx(np.mean(seven), abs=1e-12)


def test_missing_masks_leave_pixel_metrics_nan():
    metrics = compute_metrics(np.array([0.2, 0.9, 0.4]), np.array([0, 1, 0]))
    assert metrics["image_auroc"] == 1.0
    assert math.isnan(metrics["pixel_auroc"]) and math.isnan(metrics["aupro"]) and math.isnan(metrics["mad"])


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="do not match"):
        aupro(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))


def test_large_set_agrees_with_sklearn():
    # 100 images of 256 x 256: 6.5M pixels through the one-sort path
    rng = np.random.default_rng(0)
    masks = np.zeros((100, 256, 256), bool)
    for index in range(0, 100, 2):
        top, left = rng.integers(0, 200, size=2)
        masks[index, top:top + 40, left:left + 30] = True
    maps = torch.rand(100, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    maps += 0.5 * torch.from_numpy(masks)[:, None]
    labels = masks.any(axis=(1, 2)).astype(int)
    metrics = compute_metrics(maps.amax(dim=(1, 2, 3)), labels, maps, torch.from_numpy(masks))
    expected = roc_auc_score(masks.ravel(), maps.numpy().ravel())
    assert metrics["pixel_auroc"] == pytest.approx(expected, abs=1e-9)
    assert 0.5 < metrics["aupro"] < 1.0
