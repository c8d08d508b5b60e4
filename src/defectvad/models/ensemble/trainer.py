# src/defectvad/models/ensemble/trainer.py
# an ensemble of finished runs: fit calibrates each member on the run's held-out normal images (which no member
# was fitted on) and, for the weighted and logistic fusions, learns the fusion on a validation split made of
# those images and a copy of each with a synthetic anomaly (engine/synthetic_validation.py)
import numpy as np
import torch

from defectvad.data.loaders import create_dataloader
from defectvad.data.transforms import to_size_pair
from defectvad.engine.base_trainer import BaseTrainer
from defectvad.engine.devices import autocast
from defectvad.engine.inference_batch import InferenceBatch
from defectvad.engine.synthetic_validation import SyntheticAnomalySet
from defectvad.errors import ConfigError
from defectvad.models.ensemble.fusion import LEARNED, check_fusion
from defectvad.models.ensemble.members import MemberInput, check_holdout, load_members
from defectvad.models.ensemble.torch_model import EnsembleModel

VALIDATIONS = ("synthetic", "none")


class EnsembleTrainer(BaseTrainer):
    trainer_arguments = {"max_epochs": 1}
    # the ensemble takes pixels in [0, 1] and gives each member its own normalisation
    normalize_input = False
    learning_type = "one_class"
    exportable = False
    tileable = False

    def __init__(self, members, backbone=None, weights_path=None, map_size=(256, 256), center_crop=None,
                 normalize=None, calibration="zscore", calibration_quantile=0.99, fusion="mean", map_fusion=None,
                 validation="synthetic", weight_step=0.1, max_validation_pixels=100000, allow_mixed=False, seed=0,
                 aupro_fpr_limit=0.3):
        super().__init__()
        if center_crop is not None or normalize:
            raise ConfigError("model=ensemble takes its input resized, uncropped and in [0, 1]: set "
                              "transform.center_crop=null and transform.normalize=null; each member is given its "
                              "own size and normalisation")
        if validation not in VALIDATIONS:
            raise ConfigError(f"model.validation must be one of: {', '.join(VALIDATIONS)}; got '{validation}'")
        map_fusion = check_fusion(map_fusion or fusion, "model.map_fusion")
        check_fusion(fusion, "model.fusion")
        learned = [rule for rule in (fusion, map_fusion) if rule in LEARNED]
        if learned and validation == "none":
            raise ConfigError(f"the {learned[0]} fusion is learned on a validation split: set model.validation="
                              f"synthetic, or choose mean, max or rank")
        self.allow_mixed = allow_mixed
        self.validation = validation
        self.weight_step = weight_step
        self.max_validation_pixels = max_validation_pixels
        self.seed = seed
        self.runs = load_members(members, allow_mixed)
        inputs = [MemberInput(run.transform, run.normalize) for run in self.runs]
        self.model = EnsembleModel([run.model for run in self.runs], inputs, to_size_pair(map_size, "map_size"),
                                   calibration, calibration_quantile, fusion, map_fusion)
        self.fitted = {}
        self.aupro_fpr_limit = aupro_fpr_limit
        # each member's own outputs on the test images, for its metrics in this run (prepare, validation_step)
        self.test_paths = set()
        self.member_outputs = []
        self.test_has_masks = True

    def fit(self, train_loader=None, val_loader=None):
        # train_loader (the members' training images) is not used: nothing is learned from it
        holdout = self.holdout_loader
        if holdout is None:
            raise ConfigError("model=ensemble calibrates its members on held-out normal images: set "
                              "evaluation.holdout and seed to the members' own (tools/ensemble.py writes them)")
        check_holdout(self.runs, holdout.dataset, self.allow_mixed)
        self.model.to(self.device).eval()
        scores, maps, _, _ = self.collect(holdout)
        self.model.score_calibration.fit(scores.T.numpy())
        self.model.map_calibration.fit(maps.transpose(0, 1).numpy())
        self.fitted = {"calibration_images": len(holdout.dataset)}
        if needs_validation(self.model):
            self.fit_fusion(holdout)
        self.current_epoch = 1
        self.save_checkpoints()
        return self

    def fit_fusion(self, holdout):
        validation = create_dataloader(SyntheticAnomalySet(holdout.dataset, self.seed), holdout.batch_size, False)
        scores, maps, labels, masks = self.collect(validation)
        model = self.model
        calibrated = model.score_calibration(scores)
        image = model.score_fusion.fit(calibrated.numpy(), labels.numpy(), self.weight_step, self.seed)
        calibrated = model.map_calibration(maps)
        values, truth = sample_pixels(calibrated, masks, self.max_validation_pixels, self.seed)
        pixel = model.map_fusion.fit(values, truth, self.weight_step, self.seed)
        self.fitted["validation"] = {"split": "held-out normal images and a synthetic-anomaly copy of each",
                                     "images": len(validation.dataset), "pixels": len(truth),
                                     "image": image, "map": pixel}

    def prepare(self, loader):
        self.test_paths = {sample["image_path"] for sample in loader.dataset.samples}
        self.test_has_masks = getattr(loader.dataset, "has_masks", True)
        self.member_outputs = []

    def validation_step(self, batch, batch_idx):
        scores, maps = self.model.run_members(batch["image"])
        if batch["image_path"][0] in self.test_paths:
            if batch_idx == 0:
                self.member_outputs = []
            self.member_outputs.append((scores.float().cpu(), maps.float().cpu(), batch["label"].cpu(),
                                        batch["mask"][:, 0].cpu()))
        score, anomaly_map = self.model.fuse(scores, maps)
        return InferenceBatch(pred_score=score, anomaly_map=anomaly_map, extras={"member_scores": scores})

    def measure_members(self):
        # each member's metrics on this run's test images, its map resampled to the ensemble's size
        from defectvad.metrics.evaluation import compute_metrics
        from defectvad.records import METRIC_KEYS

        if not self.member_outputs:
            return [None] * len(self.runs)
        scores, maps, labels, masks = (torch.cat(parts) for parts in zip(*self.member_outputs))
        found = []
        for index in range(len(self.runs)):
            metrics = compute_metrics(scores[:, index], labels, maps[:, index],
                                      masks if self.test_has_masks else None, self.aupro_fpr_limit)
            found.append({key: metrics[key] for key in METRIC_KEYS})
        return found

    @torch.no_grad()
    def collect(self, loader):
        # raw member scores (N, M), maps (N, M, H, W), labels (N,), masks (N, H, W)
        scores, maps, labels, masks = [], [], [], []
        for batch in loader:
            images = batch["image"].to(self.device)
            with autocast(self.device, self.precision):
                found = self.model.run_members(images)
            scores.append(found[0].float().cpu())
            maps.append(found[1].float().cpu())
            labels.append(batch["label"].cpu())
            masks.append(batch["mask"][:, 0].cpu())
        return torch.cat(scores), torch.cat(maps), torch.cat(labels), torch.cat(masks)

    def summary(self):
        model = self.model
        members = [{"run_dir": str(run.run_dir), "model": run.record["run"].get("model"),
                    "backbone": run.record["run"].get("backbone"), "dataset": run.record["run"].get("dataset"),
                    "category": run.record["run"].get("category"), "image_size": run.record["run"].get("image_size"),
                    "metrics": run.record.get("metrics"), "metrics_in_this_run": measured}
                   for run, measured in zip(self.runs, self.measure_members())]
        return {"members": members, "map_size": list(model.map_size),
                "calibration": {"image": model.score_calibration.describe(), "map": model.map_calibration.describe()},
                "fusion": {"image": model.score_fusion.describe(), "map": model.map_fusion.describe()},
                **self.fitted}


def needs_validation(model):
    return model.score_fusion.rule in LEARNED or model.map_fusion.rule in LEARNED


def sample_pixels(maps, masks, limit, seed):
    # maps (N, M, H, W), masks (N, H, W) -> values (P, M), labels (P,): every pixel, or `limit` of them drawn
    # by the seed
    values = maps.permute(0, 2, 3, 1).reshape(-1, maps.shape[1]).numpy()
    labels = (masks.reshape(-1) > 0).numpy().astype(int)
    if len(labels) > limit:
        picks = np.random.default_rng(seed).choice(len(labels), limit, replace=False)
        values, labels = values[picks], labels[picks]
    return values, labels
