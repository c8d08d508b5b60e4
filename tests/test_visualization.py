# tests/test_visualization.py
import numpy as np
import torch
from PIL import Image

from defectvad.visualization.colormaps import JET, colorize
from defectvad.visualization.panels import CAPTION_HEIGHT, PREDICTED_COLOR, TRUTH_COLOR, draw_panel
from defectvad.visualization.plots import draw_roc_curve, draw_score_histogram, roc_points
from defectvad.visualization.run_images import write_run_images


def test_jet_runs_from_dark_blue_through_green_to_dark_red():
    assert JET.shape == (256, 3) and JET.dtype == np.uint8
    assert tuple(JET[0]) == (0, 0, 128) and tuple(JET[-1]) == (128, 0, 0)
    assert JET[128][1] == 255 and JET[128][0] < 140 and JET[128][2] < 140


def test_colorize_uses_one_fixed_scale_and_clips():
    colors = colorize(np.array([[-5.0, 0.0, 10.0, 99.0]]), 0.0, 10.0)
    assert colors.shape == (1, 4, 3)
    assert (colors[0, 0] == JET[0]).all() and (colors[0, 1] == JET[0]).all()
    assert (colors[0, 2] == JET[-1]).all() and (colors[0, 3] == JET[-1]).all()


def test_panel_shows_image_heatmap_and_outlines():
    image = torch.full((3, 32, 32), 0.5)
    anomaly_map = np.zeros((32, 32))
    anomaly_map[8:20, 8:20] = 1.0
    mask = np.zeros((32, 32), bool)
    mask[22:30, 22:30] = True
    panel = draw_panel(image, anomaly_map, 0.5, (0.0, 1.0), "caption", mask)
    side = 256  # small images are enlarged to at least 256 pixels
    assert panel.size == (3 * side, side + CAPTION_HEIGHT)
    pixels = np.asarray(panel)[CAPTION_HEIGHT:]
    assert tuple(pixels[side // 2, side // 2]) == (128, 128, 128)  # the image itself
    assert tuple(pixels[4, side + 4]) == tuple(JET[0]) and tuple(pixels[100, side + 100]) == tuple(JET[-1])
    overlay = pixels[:, 2 * side:]
    assert tuple(overlay[64, 100]) == PREDICTED_COLOR  # top edge of the predicted square (rows 64-159)
    assert tuple(overlay[176, 200]) == TRUTH_COLOR  # top edge of the true defect (rows 176-239)
    assert tuple(overlay[100, 100]) != PREDICTED_COLOR  # inside the region, no outline


def test_roc_points_handle_ties():
    fpr, tpr = roc_points(np.array([3.0, 2.0, 2.0, 1.0]), np.array([1, 1, 0, 0]))
    assert fpr.tolist() == [0, 0, 0.5, 1] and tpr.tolist() == [0, 0.5, 1, 1]


def test_plots_draw_curves_and_bars():
    scores = np.array([1.0, 1.2, 1.1, 3.0, 2.5, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    roc = np.asarray(draw_roc_curve(scores, labels))
    red = (roc[..., 0] > 200) & (roc[..., 1] < 80) & (roc[..., 2] < 80)
    assert red.sum() > 200
    histogram = np.asarray(draw_score_histogram(scores, labels, [("f1_test", 2.5), ("normal", None)]))
    blue = (histogram[..., 2] > 150) & (histogram[..., 0] < 180) & (histogram[..., 1] < 210)
    assert blue.sum() > 200


def fake_predictions(count=10, size=16):
    torch.manual_seed(0)
    labels = torch.tensor([0] * 5 + [1] * 5)
    # normal 0.1 ... 0.5, anomalous 0.3 ... 0.7: at the F1 threshold two normals score too high
    scores = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.3, 0.45, 0.6, 0.65, 0.7])
    maps = torch.rand(count, 1, size, size) * scores.reshape(-1, 1, 1, 1)
    masks = torch.zeros(count, 1, size, size)
    masks[5:, :, 4:8, 4:8] = 1
    paths = [f"/data/good/{i:03d}.png" for i in range(5)] + [f"/data/{t}/{i:03d}.png" for t, i in
                                                           zip(["hole"] * 3 + ["crack"] * 2, range(5))]
    return {"pred_score": scores, "anomaly_map": maps, "label": labels, "mask": masks, "image_path": paths,
            "has_masks": True}


def test_run_images_are_written_with_the_expected_names(tmp_path):
    predictions = fake_predictions()
    defect_types = ["good"] * 5 + ["hole"] * 3 + ["crack"] * 2
    thresholds = {"f1_test": {"image": 0.44, "pixel": 0.4}, "normal": {"image": 0.5, "pixel": 0.5},
                  "map_range": [0.0, 0.7]}
    (tmp_path / "stale.png").write_bytes(b"old")
    written = write_run_images(tmp_path, predictions, defect_types, thresholds, lambda path: torch.rand(3, 16, 16), 2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([
        "good_000.png", "good_001.png", "hole_000.png", "hole_001.png", "crack_003.png", "crack_004.png",
        "false_positive_1_good_004.png",  # 0.5 >= 0.44, the highest normal
        "false_negative_1_hole_000.png",  # 0.3 < 0.44, the lowest anomalous
        "roc_curve.png", "score_histogram.png",
    ])
    assert len(written) == len(names)
    with Image.open(tmp_path / "false_positive_1_good_004.png") as picture:
        assert picture.size == (3 * 256, 256 + CAPTION_HEIGHT)
