# tests/test_contract.py
# one contract test over every conf/model/*.yaml: a new model gets this coverage from its YAML alone
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from defectvad.components.tiler import Tiler
from defectvad.data.loaders import create_dataloader
from defectvad.engine.checkpoints import load_weights, save_weights
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.errors import ConfigError
from defectvad.experiment import build_trainer, check_run, resolve_k_shot
from fakes import StripesDataset

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# ensemble: built from finished runs' folders, not from a config alone (tests/test_ensemble.py)
NOT_STANDALONE = {"ensemble"}
MODELS = sorted(path.stem for path in (CONF / "model").glob("*.yaml") if path.stem not in NOT_STANDALONE)
METRIC_KEYS = {"image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "aupro", "mad"}
TRAIN_IMAGES, TEST_IMAGES = 4, 3

# every model runs on these: random backbone weights, tiny images and batches, one step
TINY = {
    "backbone.pretrained": False,
    "transform.image_size": [64, 64],
    "loader.train_batch_size": 2,
    "loader.eval_batch_size": 4,
    "trainer.max_epochs": 1,
    "trainer.progress_bar": False,
    "hardware.threads": 1,
    "evaluation.efficiency": False,
    "evaluation.save_images": False,
}
# only what a model cannot run without
MODEL_OVERRIDES = {
    # its 16 PCA components need 16 training images; the test has 4
    "dfkde": {"model.n_pca_components": 3},
    "draem": {
        # the default dtd textures would have to be downloaded
        "model.anomaly_source": "synthetic",
        # anomalib's widths (128, 64) cost seconds per step; the contract does not depend on them
        "model.reconstructive_width": 8,
        "model.discriminative_width": 8,
    },
    # the default dtd textures would have to be downloaded
    "glass": {"model.anomaly_source": "synthetic"},
    "afclip": {
        # ViT-L-14-336 is 300M parameters: a CLIP of two image blocks; few-shot (one reference image) so that the
        # memory bank is covered too (its adapter trains on the synthetic weave test split in either case)
        **{f"model.clip_architecture.{key}": value for key, value in dict(
            embed_dim=16, vision_width=32, vision_layers=2, vision_head_width=16, text_width=32, text_heads=2,
            text_layers=1).items()},
        "dataset.k_shot": 1,
    },
    # TinyCLIP ViT-8M is small enough as it is; few-shot for the reason above
    "afclip_tinyclip": {"dataset.k_shot": 1},
    "efficient_ad": {
        # its autoencoder ends in an 8x8 convolution on a 32 times smaller map
        "transform.image_size": [256, 256],
        # one training image: each costs a step and two statistics passes at 256x256
        "dataset.k_shot": 1,
        # anomalib's 384 teacher channels (768 for the student) are most of the cost at 256x256
        "model.teacher_out_channels": 16,
        # neither the teacher file nor Imagenette exist in a test
        "model.pretrained_teacher": False,
        "model.imagenet_dir": None,
    },
    "musc": {
        # ViT-L-14-336 is 300M parameters: a CLIP tower of two blocks, both scored
        **{f"model.clip_architecture.{key}": value for key, value in dict(
            embed_dim=16, vision_width=32, vision_layers=2, vision_head_width=16).items()},
        "model.layers": ["transformer.resblocks.0", "transformer.resblocks.1"],
    },
    "winclip": {
        # ViT-B-16-plus-240 takes about a minute on one core to encode its 231 prompts: a CLIP of a few layers
        **{f"model.clip_architecture.{key}": value for key, value in dict(
            embed_dim=16, vision_width=32, vision_layers=1, vision_head_width=16, text_width=32, text_heads=2,
            text_layers=1).items()},
    },
}


# config group choices, where a model's own choice is too slow for a test
MODEL_CHOICES = {
    # its config selects anomalib's ViT-B; ViT-S is the same architecture, a quarter of the cost
    "dinomaly": {"backbone": "dinov2_vits14_reg4"},
    # the same for INP-Former
    "inp_former": {"backbone": "dinov2_vits14_reg4"},
}


def model_settings(name):
    return {**TINY, **MODEL_OVERRIDES.get(name, {})}


def as_override(key, value):
    return f"{key}={json.dumps(value, separators=(',', ':'))}"


def compose_model(name, tmp_path):
    overrides = [f"model={name}", "hardware=cpu", f"paths.dataset_dir={tmp_path}", f"paths.backbone_dir={tmp_path}",
                 *(f"{group}={choice}" for group, choice in MODEL_CHOICES.get(name, {}).items()),
                 *(as_override(key, value) for key, value in model_settings(name).items())]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def loader(dataset, batch_size, shuffle=False):
    return None if dataset is None else create_dataloader(dataset, batch_size, shuffle)


def build(cfg, run_dir):
    device, weights_path = check_run(cfg)
    return build_trainer(cfg, run_dir, device, weights_path)


def stripes(trainer, count, anomalous_every=0, seed=0, size=64):
    dataset = StripesDataset(count, anomalous_every, seed, size)
    if not trainer.normalize_input:
        # models on raw pixels expect values in [0, 1]
        for item in dataset.items:
            item["image"] = ((item["image"] + 1) / 3).clamp(0, 1)
    return dataset


def train_set_for(trainer, cfg, size):
    # one-class: normal images; few-shot: its k reference images; zero-shot: none at all
    if trainer.learning_type == "zero_shot":
        return None
    k_shot = resolve_k_shot(trainer, cfg.dataset.get("k_shot"))
    return stripes(trainer, k_shot or TRAIN_IMAGES, seed=0, size=size)


@torch.no_grad()
def predict(trainer, images):
    trainer.model.eval()
    return trainer.model(images)


def write_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def write_tiny_mvtec(root, size=64):
    # MVTec AD's layout: grey noise, defects are bright squares with their masks
    rng = np.random.default_rng(0)
    noise = lambda: rng.normal(120, 10, (size, size, 3)).clip(0, 255).astype(np.uint8)  # noqa: E731
    for index in range(TRAIN_IMAGES):
        write_image(root / "train" / "good" / f"{index:03d}.png", noise())
    write_image(root / "test" / "good" / "000.png", noise())
    for index, top in enumerate((8, 30)):
        image, mask = noise(), np.zeros((size, size), np.uint8)
        image[top:top + 16, top:top + 16], mask[top:top + 16, top:top + 16] = 250, 255
        write_image(root / "test" / "square" / f"{index:03d}.png", image)
        write_image(root / "ground_truth" / "square" / f"{index:03d}_mask.png", mask)


def write_contract_experiments(folder):
    # one experiment per model: the model choice with its tiny settings, so one multirun gives each its own
    for name in MODELS:
        body = OmegaConf.to_yaml(OmegaConf.from_dotlist([as_override(k, v) for k, v in model_settings(name).items()]))
        choices = {"model": name, "hardware": "cpu", **MODEL_CHOICES.get(name, {})}
        defaults = "".join(f"  - override /{group}: {choice}\n" for group, choice in choices.items())
        text = f"# @package _global_\ndefaults:\n{defaults}\n{body}"
        (folder / "experiment").mkdir(parents=True, exist_ok=True)
        (folder / "experiment" / f"contract_{name}.yaml").write_text(text)


@pytest.fixture(scope="module")
def multirun_process(tmp_path_factory):
    # every model config through src/run.py in one multirun, to pay the imports once; one experiment file per
    # model carries its settings, since overrides on the command line would apply to every model
    workspace = tmp_path_factory.mktemp("contract")
    write_tiny_mvtec(workspace / "datasets" / "MVTecAD" / "bottle")
    write_contract_experiments(workspace / "conf")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    experiments = ",".join(f"contract_{name}" for name in MODELS)
    command = [sys.executable, str(ROOT / "src" / "run.py"), "-m", f"experiment={experiments}", "dataset=mvtec",
               f"hydra.searchpath=[file://{workspace / 'conf'}]", f"paths.dataset_dir={workspace / 'datasets'}",
               f"paths.backbone_dir={workspace / 'backbones'}", f"paths.output_dir={workspace / 'outputs'}",
               f"paths.multirun_dir={workspace / 'multirun'}", "sweep.name=contract"]
    with open(workspace / "output.txt", "w") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    yield workspace, process
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture
def overlapping_multirun(request):
    # the multirun takes the second core while the in-process checks run on the first
    if any(item.originalname == "test_model_runs_end_to_end" for item in request.session.items):
        request.getfixturevalue("multirun_process")


@pytest.mark.usefixtures("single_thread", "overlapping_multirun")
@pytest.mark.parametrize("name", MODELS)
def test_model_follows_the_contract(name, tmp_path):
    cfg = compose_model(name, tmp_path)
    size = cfg.transform.image_size[0]
    trainer = build(cfg, tmp_path / "run")
    test_set = stripes(trainer, TEST_IMAGES, anomalous_every=2, seed=1, size=size)
    test_loader = loader(test_set, cfg.loader.eval_batch_size)
    train_loader = loader(train_set_for(trainer, cfg, size), cfg.loader.train_batch_size, shuffle=True)
    trainer.fit(train_loader, None)
    trainer.prepare(test_loader)
    assert trainer.current_epoch == (0 if trainer.learning_type == "zero_shot" else 1)

    # evaluation: one typed result, score (B,) and map (B, 1, H, W) at the input size, finite floats
    images = torch.stack([item["image"] for item in test_set.items])
    outputs = predict(trainer, images)
    assert type(outputs) is InferenceBatch
    assert outputs.pred_score.shape == (TEST_IMAGES,)
    assert outputs.anomaly_map.shape == (TEST_IMAGES, 1, size, size)
    for value in (outputs.pred_score, outputs.anomaly_map):
        assert value.dtype == torch.float32 and torch.isfinite(value).all()

    # saved weights hold the whole fitted model: a fresh trainer built from the config predicts the same
    weights = save_weights(trainer.model, tmp_path / "weights.safetensors")
    torch.manual_seed(1)
    fresh = build_trainer(cfg, tmp_path / "fresh", "cpu", None)
    load_weights(fresh.model, weights)
    reloaded = predict(fresh, images)
    torch.testing.assert_close(reloaded.pred_score, outputs.pred_score, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reloaded.anomaly_map, outputs.anomaly_map, rtol=1e-5, atol=1e-6)

    # tiled: images half again as large, cut into overlapping tiles of the model's size; the stitched map has the
    # image's size and each image's score is the largest score the model gives its tiles on their own
    check_tiled_prediction(trainer, size)

    # ONNX, where the model says its evaluation is one graph with a free batch axis: traced on 2 images,
    # run on 3 in onnxruntime and compared with PyTorch as tools/export.py does
    if not trainer.exportable:
        return
    onnxruntime = pytest.importorskip("onnxruntime")
    from defectvad.export.onnx_export import TOLERANCE, export_onnx

    path = export_onnx(trainer.model, tmp_path / "model.onnx", images[:2], name)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    scores, maps = session.run(["pred_score", "anomaly_map"], {"image": images.numpy()})
    for found, expected in ((scores, outputs.pred_score.numpy()), (maps, outputs.anomaly_map.numpy())):
        # absolute up to 1, relative to the largest value above (the export tool's rule)
        np.testing.assert_allclose(found, expected, rtol=0, atol=TOLERANCE * max(1.0, np.abs(expected).max()))


def check_tiled_prediction(trainer, size):
    tiled_size = size * 3 // 2
    tiler = Tiler((size, size), (size // 2, size // 2))
    if not trainer.tileable:
        with pytest.raises(ConfigError, match="cannot be tiled"):
            trainer.configure_tiling(tiler, 2, "tile")
        return
    # one image: its four tiles go through the model two at a time
    trainer.configure_tiling(tiler, 2, "tile")
    tiled_set = stripes(trainer, 1, anomalous_every=1, seed=2, size=tiled_size)
    tiled = trainer.predict(loader(tiled_set, 1))
    assert tiled["anomaly_map"].shape == (1, 1, tiled_size, tiled_size)
    assert torch.isfinite(tiled["anomaly_map"]).all()
    tiles = tiler.tile(torch.stack([item["image"] for item in tiled_set.items]))
    assert len(tiles) == 4
    tile_scores = torch.cat([predict(trainer, tiles[start:start + 2]).pred_score for start in (0, 2)])
    torch.testing.assert_close(tiled["pred_score"], tile_scores.amax().reshape(1), rtol=1e-5, atol=1e-6)
    trainer.configure_tiling(None, None)


def read_records(sweep_dir):
    records = {}
    for path in sweep_dir.glob("*/metrics.json"):
        record = json.loads(path.read_text())
        records[record["run"]["model"]] = record
    return records


@pytest.fixture(scope="module")
def multirun(multirun_process):
    workspace, process = multirun_process
    process.wait(timeout=600)
    output = (workspace / "output.txt").read_text()
    return process.returncode, output, read_records(workspace / "multirun" / "contract")


@pytest.mark.parametrize("name", MODELS)
def test_model_runs_end_to_end(multirun, name):
    returncode, output, records = multirun
    assert name in records, output[-5000:]
    record = records[name]
    assert record["status"] == "ok", record.get("error")
    assert set(record["metrics"]) == METRIC_KEYS
    assert all(0.0 <= value <= 1.0 for value in record["metrics"].values()), record["metrics"]
    assert record["run"]["image_size"] == model_settings(name)["transform.image_size"]
    assert record["evaluation"]["test_images"] == 3
    assert (record["evaluation"]["train_images"] == 0) == (record["evaluation"]["learning_type"] == "zero_shot")


def test_the_multirun_ends_with_every_model_ok(multirun):
    returncode, output, records = multirun
    assert returncode == 0, output[-5000:]
    assert sorted(records) == MODELS
