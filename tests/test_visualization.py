# tests/test_visualization.py
import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from defectvad.visualization.panels import CAPTION_HEIGHT, PREDICTED_COLOR, TRUTH_COLOR, draw_panel
from defectvad.visualization.plots import draw_roc_curve, draw_score_histogram
from defectvad.visualization.run_images import save_png, write_run_images


def read_png(path):
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB"))


def rows_of(column, color):
    return np.nonzero((np.abs(column.astype(int) - color) <= 2).all(axis=1))[0].tolist()


def test_panel_shows_image_heatmap_and_outlines(tmp_path):
    image = torch.full((3, 32, 32), 0.5)
    anomaly_map = np.zeros((32, 32))
    anomaly_map[8:20, 8:20] = 1.0
    anomaly_map[0, 31] = 7.0  # above the run's range: drawn as its top colour
    mask = np.zeros((32, 32), bool)
    mask[22:30, 22:30] = True
    save_png(draw_panel(image, anomaly_map, 0.5, (0.0, 1.0), "caption", mask), tmp_path / "panel.png")
    panel = read_png(tmp_path / "panel.png")
    side = 256  # small images are enlarged to at least 256 pixels
    assert panel.shape == (side + CAPTION_HEIGHT, 3 * side, 3)
    pixels = panel[CAPTION_HEIGHT:]
    assert tuple(pixels[side // 2, side // 2]) == (128, 128, 128)  # the image itself
    # jet on one fixed range: dark blue at its low end, dark red at its high end and above
    low, high = (np.asarray(colormaps["jet"](value, bytes=True)[:3]) for value in (0.0, 1.0))
    assert np.abs(low.astype(int) - (0, 0, 128)).max() <= 1 and np.abs(high.astype(int) - (128, 0, 0)).max() <= 1
    assert (pixels[4, side + 4] == low).all() and (pixels[100, side + 100] == high).all()
    assert (pixels[2, 2 * side - 2] == high).all()
    overlay = pixels[:, 2 * side:]
    # the predicted square covers rows and columns 64-159, the true defect 176-239: two-pixel outlines on
    # their borders, nowhere else along a line through them
    assert rows_of(overlay[:, 100], PREDICTED_COLOR) == [63, 64, 159, 160]
    assert rows_of(overlay[100], PREDICTED_COLOR) == [63, 64, 159, 160]
    assert rows_of(overlay[:, 200], TRUTH_COLOR) == [175, 176, 239, 240]
    # inside, the overlay is half image, half heatmap
    assert np.abs(overlay[100, 100].astype(int) - (0.5 * 128 + 0.5 * high)).max() <= 2


def test_panel_outlines_a_region_that_touches_the_border(tmp_path):
    anomaly_map = np.zeros((16, 16))
    anomaly_map[:, 8:] = 1.0
    save_png(draw_panel(np.zeros((16, 16, 3), np.uint8), anomaly_map, 0.5, (0.0, 1.0)), tmp_path / "panel.png")
    overlay = read_png(tmp_path / "panel.png")[CAPTION_HEIGHT:, 2 * 256:]
    assert rows_of(overlay[:, 200], PREDICTED_COLOR) == [0, 255]  # closed along the image's edge
    assert rows_of(overlay[100], PREDICTED_COLOR) == [127, 128, 255]


def test_roc_curve_steps_through_ties_and_reports_the_area():
    figure = draw_roc_curve(np.array([3.0, 2.0, 2.0, 1.0]), np.array([1, 1, 0, 0]))
    axes = figure.axes[0]
    curve = axes.lines[-1]
    assert curve.get_xdata().tolist() == [0, 0, 0.5, 1] and curve.get_ydata().tolist() == [0, 0.5, 1, 1]
    assert axes.get_title() == "ROC curve, AUROC 0.875"  # 0.5 * 0.75 + 0.5 * 1
    single = draw_roc_curve(np.array([1.0, 2.0]), np.array([0, 0])).axes[0]
    assert single.get_title() == "ROC curve" and single.texts[0].get_text() == "needs normal and anomalous images"


def test_histogram_counts_both_classes_and_draws_the_thresholds(tmp_path):
    scores = np.array([1.0, 1.2, 1.1, 3.0, 2.5, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    figure = draw_score_histogram(scores, labels, [("f1_test", 2.5), ("normal", None)], bins=3)
    axes = figure.axes[0]
    normal, anomalous = axes.containers
    # three bins over [0.9, 3.0]: edges 0.9, 1.6, 2.3, 3.0
    assert [bar.get_height() for bar in normal] == [3, 0, 0]
    assert [bar.get_height() for bar in anomalous] == [1, 0, 2]
    assert [line.get_xdata()[0] for line in axes.lines] == [2.5]
    assert [text.get_text() for text in axes.get_legend().get_texts()] == [
        "normal (3)", "anomalous (3)", "threshold f1_test 2.5"]
    save_png(figure, tmp_path / "histogram.png")
    assert read_png(tmp_path / "histogram.png").shape == (380, 600, 3)


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


def yellow_pixels(path):
    pixels = read_png(path).astype(int)
    return (pixels[..., 0] > 200) & (pixels[..., 1] > 200) & (pixels[..., 2] < 60)


def test_run_images_draw_the_graded_regions(tmp_path):
    # grading.json's boxes (inclusive pixels of the 16-pixel map) and labels in yellow on the overlay
    predictions = fake_predictions()
    defect_types = ["good"] * 5 + ["hole"] * 3 + ["crack"] * 2
    thresholds = {"f1_test": {"image": 0.44, "pixel": 0.4}, "normal": {"image": 0.5, "pixel": 0.5},
                  "map_range": [0.0, 0.7]}

    def grey(path):
        return torch.full((3, 16, 16), 0.5)

    path = predictions["image_path"][5]
    grades = {path: {"level": 4, "type": "hole", "regions": [{"bbox": [4, 4, 7, 7], "level": 4, "type": "hole"}]}}
    write_run_images(tmp_path / "plain", predictions, defect_types, thresholds, grey, 1)
    write_run_images(tmp_path / "graded", predictions, defect_types, thresholds, grey, 1, grades)
    assert not yellow_pixels(tmp_path / "plain" / "hole_000.png").any()
    assert not yellow_pixels(tmp_path / "graded" / "good_000.png").any()
    # the box and its label sit in the third tile (the overlay, below the caption): the box's outer edges at map
    # pixels 4 and 8 (its last pixel 7 included), 16 screen pixels each; the label just above it
    ys, xs = np.nonzero(yellow_pixels(tmp_path / "graded" / "hole_000.png"))
    assert abs(xs.min() - (2 * 256 + 4 * 16)) <= 1 and abs(xs.max() - (2 * 256 + 8 * 16)) <= 1
    assert abs(ys.max() - (CAPTION_HEIGHT + 8 * 16)) <= 1
    assert CAPTION_HEIGHT + 2 * 16 < ys.min() < CAPTION_HEIGHT + 4 * 16
