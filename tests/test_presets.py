# tests/test_presets.py
import functools
import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from PIL import Image

from defectvad.data.transforms import ImageTransform

ROOT = Path(__file__).resolve().parents[1]
MODELS = sorted(path.stem for path in (ROOT / "conf" / "model").glob("*.yaml"))
PRESETS = sorted(path.stem for path in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    # one initialisation for the module: each one re-reads the config folder
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield


def compose_config(overrides):
    return compose_cached(tuple(overrides))


@functools.lru_cache(maxsize=None)
def compose_cached(overrides):
    # a composition takes a few tenths of a second; the tests only read the result
    return compose("config", overrides=list(overrides), return_hydra_config=True)


def init_parameters(cls):
    # the keyword arguments a class accepts, following **kwargs up to its parents
    names = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        names |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return names


def test_every_model_has_a_preset_of_its_name():
    assert MODELS and set(MODELS) <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_selects_its_model_and_sets_the_whole_setup(name):
    cfg = compose_config([f"experiment={name}"])
    choices = cfg.hydra.runtime.choices
    assert (choices.experiment, choices.model) == (name, name)
    assert cfg.model._target_ == OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")._target_
    # every preset states size, crop, batch sizes and schedule itself rather than inheriting them
    text = (ROOT / "conf" / "experiment" / f"{name}.yaml").read_text()
    assert text.splitlines()[:2] == ["# @package _global_", f"# conf/experiment/{name}.yaml"]
    preset = OmegaConf.create(text)
    assert {"image_size", "center_crop"} <= set(preset.transform)
    assert {"train_batch_size", "eval_batch_size"} <= set(preset.loader)
    assert {"max_epochs", "max_steps", "early_stopping"} <= set(preset.trainer)
    assert "override /backbone" in "".join(str(entry) for entry in preset.defaults)
    # a renamed or removed model argument breaks the preset here rather than at run time
    unknown = set(cfg.model) - {"_target_", "_recursive_"} - init_parameters(get_class(cfg.model._target_))
    assert not unknown


def test_patchcore_preset_is_anomalib_2():
    cfg = compose_config(["experiment=patchcore", "dataset=mvtec", "dataset.category=bottle"])
    assert (cfg.hydra.runtime.choices.dataset, cfg.dataset.category) == ("mvtec", "bottle")
    assert cfg.backbone.name == "wide_resnet50_2"
    assert list(cfg.model.layers) == ["layer2", "layer3"]
    assert (cfg.model.coreset_sampling_ratio, cfg.model.num_neighbors) == (0.1, 9)
    # anomalib 2.1 and later resize to 256 and crop nothing unless asked
    assert list(cfg.transform.image_size) == [256, 256] and cfg.transform.center_crop is None
    assert (cfg.loader.train_batch_size, cfg.loader.eval_batch_size) == (32, 32)
    assert (cfg.trainer.max_epochs, cfg.trainer.early_stopping.monitor) == (1, None)


def test_padim_dfm_dfkde_presets():
    padim = compose_config(["experiment=padim"])
    assert padim.backbone.name == "resnet18" and list(padim.model.layers) == ["layer1", "layer2", "layer3"]
    assert padim.model.n_features is None and padim.trainer.max_epochs == 1
    dfm = compose_config(["experiment=dfm"])
    assert (dfm.backbone.name, dfm.model.layer, dfm.model.pooling_kernel_size, dfm.model.pca_level) == (
        "resnet50", "layer3", 4, 0.97)
    dfkde = compose_config(["experiment=dfkde"])
    assert (dfkde.backbone.name, list(dfkde.model.layers), dfkde.model.n_pca_components) == ("resnet18", ["layer4"], 16)


def test_trained_presets_follow_anomalib_example_configs():
    # model: (backbone, max_epochs, max_steps, early-stopping monitor, patience, train batch size)
    expected = {
        "stfpm": ("resnet18", 100, None, "pixel_auroc", 5, 32),
        "fastflow": ("resnet18", 500, None, "pixel_auroc", 3, 32),
        "cfa": ("wide_resnet50_2", 30, None, "pixel_auroc", 5, 32),
        "reverse_distillation": ("wide_resnet50_2", 200, None, "pixel_auroc", 3, 16),
        "draem": ("efficientnet_lite0", 700, None, "pixel_auroc", 20, 32),
        "efficient_ad": ("efficientnet_lite0", 1000, 70000, None, 3, 1),
        "uninet": ("wide_resnet50_2", 100, None, "image_auroc", 20, 32),
    }
    for name, values in expected.items():
        cfg = compose_config([f"experiment={name}"])
        stopping = cfg.trainer.early_stopping
        assert (cfg.backbone.name, cfg.trainer.max_epochs, cfg.trainer.max_steps, stopping.monitor, stopping.patience,
                cfg.loader.train_batch_size) == values, name
        assert list(cfg.transform.image_size) == [256, 256] and cfg.transform.center_crop is None
    reverse = compose_config(["experiment=reverse_distillation"])
    assert reverse.trainer.check_val_every_n_epoch == 200 and list(reverse.model.layers) == ["layer1", "layer2", "layer3"]
    assert compose_config(["experiment=draem"]).model.focal_alpha == 1.0
    assert compose_config(["experiment=efficient_ad"]).model.model_size == "small"
    glass = compose_config(["experiment=glass"])
    assert (glass.backbone.name, glass.trainer.max_epochs, glass.loader.train_batch_size, list(glass.transform.image_size),
            glass.model.anomaly_source, glass.model.svd) == ("wide_resnet50_2", 100, 8, [288, 288], "dtd", 0)


def test_model_alone_keeps_the_demo_backbone_and_the_command_line_beats_the_preset():
    assert compose_config(["model=patchcore"]).backbone.name == "efficientnet_lite0"
    cfg = compose_config(["experiment=patchcore", "backbone=resnet18", "transform.center_crop=[224,224]"])
    assert cfg.backbone.name == "resnet18" and list(cfg.transform.center_crop) == [224, 224]
    assert list(cfg.model.layers) == ["layer2", "layer3"]


def test_stfpm_preset_reaches_the_trainer(single_thread):
    cfg = compose_config(["experiment=stfpm"])
    trainer = instantiate(cfg.model, backbone=cfg.backbone.name, weights_path=None, _convert_="all")
    # the loop's own settings, as the run passes them (keys such as the validation split are the run's)
    accepted = inspect.signature(trainer.configure_engine).parameters
    engine = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer.configure_engine(**{key: value for key, value in engine.items() if key in accepted})
    assert (trainer.max_epochs, trainer.max_steps, trainer.recalibrate_batchnorm) == (100, None, False)
    assert (trainer.early_stopping.monitor, trainer.early_stopping.patience) == ("pixel_auroc", 5)


def test_preset_size_and_crop_reach_the_transform():
    cfg = compose_config(["experiment=patchcore", "transform.center_crop=[224,224]"])
    transform = ImageTransform(cfg.transform.image_size, cfg.transform.center_crop, True)
    image, mask = transform(Image.new("RGB", (300, 200), (255, 0, 0)))
    assert image.shape == (3, 224, 224) and mask.shape == (1, 224, 224)
    # pure red, ImageNet-normalised: (1 - 0.485) / 0.229 in the red channel
    assert abs(image[0, 100, 100].item() - (1 - 0.485) / 0.229) < 1e-4
