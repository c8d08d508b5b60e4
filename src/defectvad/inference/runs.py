# src/defectvad/inference/runs.py
import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from defectvad.data.images import check_max_image_pixels
from defectvad.data.transforms import create_transform
from defectvad.engine.checkpoints import load_weights
from defectvad.engine.devices import resolve_device
from defectvad.engine.positions import build_trainer_for_tiling
from defectvad.engine.tiling import create_tiler, tiled_model_settings
from defectvad.errors import ConfigError, DefectVADError

# best.safetensors exists only when early stopping chose an epoch, whose weights the run's metrics come from
WEIGHT_FILES = ("weights/best.safetensors", "weights/last.safetensors")
# model settings that only fetch what training needs (teacher files, penalty or texture images); the
# run's weights replace whatever they would load, so a machine without those files can still predict
TRAINING_ONLY = {"pretrained_teacher": False, "imagenet_dir": None, "anomaly_source": "synthetic"}


def find_run_problems(run_dir):
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return ["the folder does not exist"]
    problems = []
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        problems.append("no metrics.json")
    else:
        try:
            status = json.loads(metrics.read_text()).get("status")
        except (OSError, ValueError):
            status = "unreadable"
        if status != "ok":
            problems.append(f"metrics.json has status '{status}', not 'ok'")
    if not (run_dir / "config.yaml").is_file():
        problems.append("no config.yaml")
    if not any((run_dir / name).is_file() for name in WEIGHT_FILES):
        problems.append(f"no {' or '.join(WEIGHT_FILES)}")
    return problems


def check_run_dir(run_dir):
    problems = find_run_problems(run_dir)
    if problems:
        raise ConfigError(f"{run_dir} is not a complete run folder ({'; '.join(problems)}); give the folder of a "
                          f"run that finished with status ok")
    return Path(run_dir)


class TrainedRun:
    # a finished run rebuilt from its folder alone: config.yaml, metrics.json and the weights file
    # (which holds the whole model, backbone included, so no backbone file or training data is read)
    def __init__(self, run_dir, device="auto"):
        self.run_dir = check_run_dir(run_dir)
        self.record = json.loads((self.run_dir / "metrics.json").read_text())
        self.cfg = OmegaConf.load(self.run_dir / "config.yaml")
        self.weights_path = next(self.run_dir / name for name in WEIGHT_FILES if (self.run_dir / name).is_file())
        self.device = resolve_device(device)
        self.precision = self.cfg.hardware.precision
        # a tiled run predicts tile by tile, as it was evaluated
        size = self.cfg.transform.center_crop or self.cfg.transform.image_size
        self.tiler = create_tiler(self.cfg.get("tiling"), size)
        self.trainer = self.build_trainer()
        self.model = self.trainer.model.to(self.device).eval()
        normalize = self.cfg.transform.normalize
        self.normalize = self.trainer.normalize_input if normalize is None else bool(normalize)
        # the picture as the model sees it before normalisation; normalisation is applied apart
        self.transform = create_transform(self.cfg.transform, self.cfg.backbone.name, False)
        self.max_image_pixels = check_max_image_pixels(self.cfg.dataset.get("max_image_pixels"))
        self.thresholds = self.record.get("thresholds")
        if not self.thresholds:
            raise ConfigError(f"{self.run_dir} was trained before thresholds were stored in metrics.json; "
                              f"train it again")

    def build_trainer(self):
        model_cfg = OmegaConf.to_container(self.cfg.model, resolve=True)
        for key, value in TRAINING_ONLY.items():
            if key in model_cfg:
                model_cfg[key] = value
        size = self.cfg.transform.center_crop or self.cfg.transform.image_size
        trainer = build_trainer_for_tiling(
            lambda: instantiate(model_cfg, backbone=self.cfg.backbone.name, weights_path=None, _convert_="all",
                                **tiled_model_settings(self.cfg, self.tiler)), self.cfg.get("tiling"), self.tiler, size)
        if self.tiler is not None:
            trainer.configure_tiling(self.tiler, self.cfg.tiling.batch_size or self.cfg.loader.eval_batch_size,
                                     self.cfg.tiling.image_score)
        try:
            load_weights(trainer.model, self.weights_path)
        except RuntimeError as error:
            raise DefectVADError(f"{self.weights_path} does not fit the model described by config.yaml: "
                                 f"{str(error).splitlines()[0]}") from error
        return trainer

    @property
    def name(self):
        run = self.record.get("run", {})
        return f"{run.get('model')} ({run.get('backbone')})"

    @property
    def image_shape(self):
        size = self.cfg.transform.center_crop or self.cfg.transform.image_size
        size = [size, size] if isinstance(size, int) else list(size)
        return [3, *size]

    def example_inputs(self, batch_size, seed=0):
        generator = torch.Generator().manual_seed(seed)
        shape = (batch_size, *self.image_shape)
        if self.normalize:
            return torch.randn(shape, generator=generator)
        return torch.rand(shape, generator=generator)
