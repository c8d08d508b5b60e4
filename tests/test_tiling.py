# tests/test_tiling.py
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from defectvad.components.tiler import Tiler, covered_size
from defectvad.data.loaders import create_dataloader
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.engine.tiling import TiledLoader, create_tiler, images_per_tile_batch, predict_tiles
from defectvad.errors import ConfigError
from defectvad.metrics.evaluation import compute_metrics
from defectvad.metrics.pixel_histogram import PixelHistogram
from defectvad.metrics.streamed_pixels import StreamedPixels

ROOT = Path(__file__).resolve().parents[1]


def test_the_covered_size_is_the_smallest_that_whole_tiles_reach():
    # (100 - 32) / 24 is not whole: three strides past the first tile, 3 * 24 + 32
    assert covered_size(100, 32, 24) == 104
    assert covered_size(104, 32, 24) == 104
    assert covered_size(64, 64, 16) == 64


def test_tiles_are_the_image_windows_row_by_row():
    images = torch.rand(2, 3, 42, 50)
    tiles = Tiler((16, 20), (12, 15), "padding").tile(images)
    # (42 - 16) / 12 is not whole: zeros below to 52, rows at 0, 12, 24, 36; (50 - 20) / 15 is: columns 0, 15, 30
    padded = torch.zeros(2, 3, 52, 50)
    padded[..., :42, :] = images
    corners = [(top, left) for top in (0, 12, 24, 36) for left in (0, 15, 30)]
    expected = torch.stack([torch.stack([padded[b, :, t:t + 16, l:l + 20] for t, l in corners]) for b in range(2)])
    torch.testing.assert_close(tiles, expected.flatten(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["padding", "interpolation"])
def test_untiling_the_tiles_gives_the_image_back(mode):
    images = torch.rand(2, 3, 45, 37)
    tiler = Tiler((16, 16), (10, 12), mode)
    restored = tiler.untile(tiler.tile(images), (45, 37))
    if mode == "padding":
        torch.testing.assert_close(restored, images, rtol=0, atol=1e-6)
    else:
        assert restored.shape == images.shape


def test_overlaps_are_averaged():
    # two tiles side by side overlapping in 4 columns: values 1 and 3 average to 2 there
    tiler = Tiler((8, 8), (8, 4), "padding")
    tiles = torch.stack([torch.full((1, 8, 8), 1.0), torch.full((1, 8, 8), 3.0)])
    stitched = tiler.untile(tiles, (8, 12))[0, 0]
    assert stitched[:, :4].eq(1).all() and stitched[:, 4:8].eq(2).all() and stitched[:, 8:].eq(3).all()


def test_maps_at_another_resolution_are_stitched_on_a_scaled_grid():
    # a model whose map is half the tile's size: the stitched map is half the image's size
    tiler = Tiler((8, 8), (4, 4), "padding")
    maps = torch.arange(9.0).reshape(9, 1, 1, 1).expand(9, 1, 4, 4)
    stitched = tiler.untile(maps, (16, 16))
    assert stitched.shape == (1, 1, 8, 8)
    # the top-left 2x2 block is covered by tile 0 only; the next block by tiles 0 and 1
    assert stitched[0, 0, 0, 0] == 0 and stitched[0, 0, 0, 2] == 0.5


def fake_dataset(count, size):
    images = torch.rand(count, 3, *size)

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return count

        def __getitem__(self, index):
            return {"image": images[index], "label": 0, "mask": torch.zeros(1, *size), "image_path": f"{index}.png"}

    return Images(), images


def test_the_tiled_loader_gives_every_tile_once_per_epoch():
    dataset, images = fake_dataset(5, (40, 40))
    tiler = Tiler((16, 16), (12, 12))
    per_batch = images_per_tile_batch(tiler, (40, 40), 6)
    loader = TiledLoader(create_dataloader(dataset, per_batch, True), tiler, 6, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader)
    assert all(len(batch["image"]) <= 6 for batch in batches)
    seen = torch.cat([batch["image"] for batch in batches])
    expected = tiler.tile(images)
    assert len(seen) == len(expected) == len(loader.dataset) == 5 * 9
    key = lambda tiles: sorted(tiles.flatten(1)[:, :8].sum(1).tolist())  # noqa: E731
    np.testing.assert_allclose(key(seen), key(expected))
    # names follow their tiles
    first = batches[0]
    for tile, path in zip(first["image"], first["image_path"]):
        assert any(torch.equal(tile, other) for other in tiler.tile(images[int(path[0])].unsqueeze(0)))


def test_tiled_prediction_stitches_maps_and_scores_by_tile_or_map():
    # a model whose map is the image's first channel and whose score is the tile's mean
    def step(batch, batch_idx):
        return {"pred_score": batch["image"].mean(dim=(1, 2, 3)), "anomaly_map": batch["image"][:, :1]}

    images = torch.rand(2, 3, 30, 30)
    batch = {"image": images, "label": torch.tensor([0, 1]), "mask": torch.zeros(2, 1, 30, 30),
             "image_path": ["a", "b"]}
    tiler = Tiler((16, 16), (8, 8))
    by_tile = predict_tiles(step, batch, 0, tiler, 3, "tile")
    torch.testing.assert_close(by_tile["anomaly_map"], images[:, :1], rtol=0, atol=1e-6)
    tile_means = tiler.tile(images).mean(dim=(1, 2, 3)).reshape(2, -1)
    torch.testing.assert_close(by_tile["pred_score"], tile_means.amax(dim=1))
    by_map = predict_tiles(step, batch, 0, tiler, 3, "map")
    torch.testing.assert_close(by_map["pred_score"], images[:, 0].flatten(1).amax(dim=1), rtol=0, atol=1e-6)
    assert "reconstruction" not in by_map

    # a reconstruction model's output tiles are stitched too (its reconstruction block judges whole images)
    def reconstructing(batch, batch_idx):
        return InferenceBatch(batch["image"].mean(dim=(1, 2, 3)), batch["image"][:, :1],
                              {"reconstruction": 1 - batch["image"]})

    stitched = predict_tiles(reconstructing, batch, 0, tiler, 3, "tile")
    torch.testing.assert_close(stitched["reconstruction"], 1 - images, rtol=0, atol=1e-6)


def tiling(**settings):
    return OmegaConf.create({"tile_size": None, "stride": None, "mode": "padding", "image_score": "tile",
                             "batch_size": None, **settings})


def test_tiling_settings_are_checked():
    assert create_tiler(tiling(), [256, 256]) is None
    assert create_tiler(tiling(tile_size=64), [256, 256]).stride == (64, 64)
    for settings, words in ((tiling(tile_size=64, mode="mirror"), "tiling.mode must be one of: padding"),
                            (tiling(tile_size=64, image_score="mean"), "tiling.image_score must be one of"),
                            (tiling(tile_size=64, stride=80), "larger than tiling.tile_size"),
                            (tiling(tile_size=512), "larger than transform.image_size")):
        with pytest.raises(ConfigError, match=words):
            create_tiler(settings, [256, 256])


def random_maps(seed, count=5, size=(24, 32), quantized=False):
    rng = np.random.default_rng(seed)
    maps = rng.normal(size=(count, *size)).astype(np.float32)
    if quantized:
        # values on a grid of 1/16 have at most 12 significant bits: every bin holds one value
        maps = np.round(maps * 16) / 16
    masks = np.zeros((count, *size), bool)
    masks[1, 3:9, 4:12] = True
    masks[1, 15:18, 20:30] = True
    masks[3, 10:20, 10:14] = True
    maps[masks] += 1.5
    return maps.astype(np.float32), masks


@pytest.mark.parametrize("quantized", [True, False])
def test_streamed_pixel_metrics_match_the_exact_ones(quantized):
    maps, masks = random_maps(0, quantized=quantized)
    labels = masks.reshape(len(maps), -1).any(axis=1)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    exact = compute_metrics(scores, labels, maps, masks)
    histogram = PixelHistogram()
    for anomaly_map, mask in zip(maps, masks):
        histogram.add(anomaly_map, mask)
    streamed = compute_metrics(scores, labels, pixel_histogram=histogram)
    tolerance = 1e-12 if quantized else 2e-4
    for key in ("pixel_auroc", "pixel_ap", "pixel_f1max", "aupro"):
        assert abs(streamed[key] - exact[key]) <= tolerance, (key, streamed[key], exact[key])
    assert 0.5 < exact["pixel_auroc"] < 1 and 0 < exact["aupro"] < 1


class MaskFiles:
    # a data set whose masks at full resolution are twice the input size
    def __init__(self, masks):
        self.masks = masks
        self.samples = [{"image_path": f"{index}.png", "category": "a" if index < 2 else "b"}
                        for index in range(len(masks))]

    def load_full_resolution_mask(self, sample):
        return self.masks[int(sample["image_path"][0])]


def test_full_resolution_maps_are_resized_to_their_masks():
    # maps at 12x16 against masks at 24x32: the same as resizing each map bilinearly and judging it exactly
    maps, _ = random_maps(1, count=4, size=(12, 16))
    _, masks = random_maps(2, count=4, size=(24, 32))
    maps = torch.from_numpy(maps).unsqueeze(1)
    sink = StreamedPixels(MaskFiles(masks), full_resolution=True)
    sink.add(maps[:2], {"image_path": ["0.png", "1.png"]})
    sink.add(maps[2:], {"image_path": ["2.png", "3.png"]})
    resized = torch.nn.functional.interpolate(maps, size=(24, 32), mode="bilinear", align_corners=False)[:, 0]
    exact = compute_metrics([0, 1, 0, 1], [0, 1, 0, 1], resized, masks)
    streamed = sink.total.metrics()
    assert abs(streamed["auroc"] - exact["pixel_auroc"]) < 2e-4
    assert abs(streamed["aupro"] - exact["aupro"]) < 2e-4
    # each category has its own histogram: category a holds images 0 and 1
    exact_a = compute_metrics([0, 1], [0, 1], resized[:2], masks[:2])
    assert abs(sink.categories["a"].metrics()["auroc"] - exact_a["pixel_auroc"]) < 2e-4


def write_panels(root):
    # 160-pixel grey noise; defects are bright squares with their masks
    rng = np.random.default_rng(0)
    for folder in ("good", "bad", "masks"):
        (root / folder).mkdir(parents=True)
    for index in range(6):
        noise = rng.normal(120, 10, (160, 160, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(noise).save(root / "good" / f"{index}.png")
    for index in range(2):
        image, mask = rng.normal(120, 10, (160, 160, 3)).clip(0, 255).astype(np.uint8), np.zeros((160, 160), np.uint8)
        image[40 * index + 20:40 * index + 50, 60:90], mask[40 * index + 20:40 * index + 50, 60:90] = 250, 255
        Image.fromarray(image).save(root / "bad" / f"b{index}.png")
        Image.fromarray(mask).save(root / "masks" / f"b{index}.png")


def test_a_tiled_run_at_full_resolution_records_how_it_was_judged(tmp_path):
    # 160-pixel images resized to 96, cut into 64-pixel tiles every 32 (2x2), the stitched 96-pixel maps judged
    # against the 160-pixel masks
    write_panels(tmp_path / "panels")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, str(ROOT / "src" / "run.py"), "hardware=cpu", "backbone=resnet18",
               "backbone.pretrained=false", "dataset=folder", f"dataset.root={tmp_path / 'panels'}",
               "dataset.abnormal_dir=bad", "dataset.mask_dir=masks", "transform.image_size=[96,96]",
               "tiling.tile_size=64", "tiling.stride=32", "evaluation.full_resolution=true",
               "evaluation.efficiency=false", "trainer.progress_bar=false", f"paths.backbone_dir={tmp_path}",
               f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["status"] == "ok"
    assert record["evaluation"]["tiling"] == {"tile_size": [64, 64], "stride": [32, 32], "mode": "padding",
                                              "image_score": "tile", "tiles_per_image": 4}
    assert record["evaluation"]["resolution"].startswith("full")
    assert all(0.0 <= value <= 1.0 for value in record["metrics"].values())
    # bright squares on noise: found at full resolution too
    assert record["metrics"]["pixel_auroc"] > 0.9
    # pictures are drawn at the size of the kept maps
    assert list((tmp_path / "run" / "images").glob("*.png"))

    # tools/predict.py rebuilds the tiled model and scores the test images as the run did
    spec = importlib.util.spec_from_file_location("predict_tool", ROOT / "tools" / "predict.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(tmp_path / "run"), str(tmp_path / "panels" / "bad"), "--out", str(tmp_path / "out"),
                      "--no-pictures", "--device", "cpu"]) == 0
    with open(tmp_path / "run" / "test_scores.csv") as file:
        expected = {Path(row["image_path"]).name: float(row["pred_score"]) for row in csv.DictReader(file)}
    with open(tmp_path / "out" / "predictions.csv") as file:
        found = {Path(row["path"]).name: float(row["score"]) for row in csv.DictReader(file)}
    assert set(found) == {"b0.png", "b1.png"}
    for name, score in found.items():
        assert score == pytest.approx(expected[name], rel=1e-5)


def write_position_panels(root, rng):
    # 64-pixel grey noise whose top-left quarter always holds vertical stripes; the defect: stripes in the top-right
    # quarter too, where the training images never have them
    def panel(stripes_right):
        image = rng.normal(120, 6, (64, 64, 3))
        image[:32, :32:4] = 230
        if stripes_right:
            image[:32, 32::4] = 230
        return Image.fromarray(image.clip(0, 255).astype(np.uint8))

    for folder in ("good", "bad", "masks"):
        (root / folder).mkdir(parents=True)
    for index in range(10):
        panel(False).save(root / "good" / f"{index}.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:32, 32:] = 255
    for index in range(2):
        panel(True).save(root / "bad" / f"b{index}.png")
        Image.fromarray(mask).save(root / "masks" / f"b{index}.png")


def test_per_position_models_learn_what_belongs_where(tmp_path):
    from hydra import compose, initialize_config_dir

    from defectvad.experiment import run_experiment
    from defectvad.inference.predictions import load_input, predict_files
    from defectvad.inference.runs import TrainedRun

    write_position_panels(tmp_path / "panels", np.random.default_rng(0))
    overrides = ["model=padim", "hardware=cpu", "hardware.threads=1", "backbone=resnet18", "backbone.pretrained=false",
                 "dataset=folder", f"dataset.root={tmp_path / 'panels'}", "dataset.abnormal_dir=bad",
                 "dataset.mask_dir=masks", "dataset.normal_test_ratio=0.2", "transform.image_size=[64,64]",
                 "tiling.tile_size=32", "evaluation.save_images=false", "evaluation.efficiency=false",
                 "grading.enabled=false", "trainer.progress_bar=false"]
    records = {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for per_position in (False, True):
            cfg = compose("config", overrides=[*overrides, f"tiling.per_position={per_position}"])
            run_dir = tmp_path / f"per_position_{per_position}"
            records[per_position] = run_experiment(cfg, run_dir, {"model": "padim", "dataset": "folder"}, [], ROOT)
    shared, positions = records[False], records[True]
    assert positions["model"]["tile_positions"] == 4
    # one model for all tiles has seen stripes (top left) and takes them as normal anywhere; the top-right model
    # never saw them there
    assert positions["metrics"]["pixel_ap"] > 0.95 and positions["metrics"]["aupro"] > 0.95
    assert shared["metrics"]["pixel_ap"] < positions["metrics"]["pixel_ap"] - 0.4
    assert shared["metrics"]["aupro"] < positions["metrics"]["aupro"] - 0.3

    # the run is one state dict: tools/predict.py rebuilds the four models and routes each tile to its own
    run = TrainedRun(tmp_path / "per_position_True", "cpu")
    assert len(run.trainer.trainers) == 4
    with open(tmp_path / "per_position_True" / "test_scores.csv") as file:
        rows = list(csv.DictReader(file))
    found = {str(path): (score, anomaly_map) for path, _, score, anomaly_map in
             predict_files(run, [Path(row["image_path"]) for row in rows], 4, [])}
    for row in rows:
        assert found[row["image_path"]][0] == pytest.approx(float(row["pred_score"]), rel=1e-5)
    # without overlap each quarter of the map is its position's model's map of that quarter
    bad = next(row["image_path"] for row in rows if row["image_path"].endswith("b0.png"))
    picture, model_input = load_input(Path(bad), run.transform, run.normalize)
    anomaly_map = found[bad][1]
    for position, (top, left) in enumerate([(0, 0), (0, 32), (32, 0), (32, 32)]):
        alone = run.trainer.trainers[position].model(model_input[None, :, top:top + 32, left:left + 32])
        torch.testing.assert_close(anomaly_map[top:top + 32, left:left + 32], alone["anomaly_map"][0, 0].float(),
                                   rtol=1e-5, atol=1e-5)
