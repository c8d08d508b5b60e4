# src/run.py
import logging
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DEFECTVAD_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from defectvad.records import METRIC_KEYS, format_metrics_table, read_git_commit, write_json_atomic, write_text_atomic  # noqa: E402
from defectvad.sweeps.callbacks import prepare_sweeps  # noqa: E402
from defectvad.sweeps.jobs import find_user_error, run_single_job, run_sweep_job  # noqa: E402
from defectvad.sweeps.processes import read_peak_memory, stop_on_sigterm  # noqa: E402

log = logging.getLogger("defectvad")
prepare_sweeps()


def run_experiment(cfg, run_dir, choices, overrides):
    import torch

    from defectvad.backbones.weights import resolve_weights, verify_weights
    from defectvad.data.loaders import create_dataloader
    from defectvad.data.transforms import ImageTransform
    from defectvad.engine.devices import check_precision, resolve_device, set_threads
    from defectvad.engine.seeding import seed_everything
    from defectvad.metrics.evaluation import compute_metrics

    record = {
        "status": "running",
        "run": {
            "model": choices.get("model"), "backbone": cfg.backbone.name, "dataset": choices.get("dataset"),
            "category": cfg.dataset.get("category"), "seed": cfg.seed, "image_size": list(cfg.transform.image_size),
            "overrides": overrides, "git_commit": read_git_commit(ROOT), "run_dir": str(run_dir),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    # a run killed outright leaves "running", never a stale "ok"
    write_json_atomic(run_dir / "metrics.json", record)
    try:
        # cheap checks first: a missing weights file stops the run before any data or model work
        device = resolve_device(cfg.hardware.accelerator)
        check_precision(cfg.hardware.precision)
        weights_path = None
        if cfg.backbone.pretrained:
            weights_path = resolve_weights(cfg.backbone.name, cfg.paths.backbone_dir, cfg.backbone.weights)
            verify_weights(weights_path)
        threads = set_threads(cfg.hardware.threads)
        seed_everything(cfg.seed)

        trainer = instantiate(cfg.model, backbone=cfg.backbone.name, weights_path=weights_path, _convert_="all")
        normalize = trainer.normalize_input if cfg.transform.normalize is None else cfg.transform.normalize
        transform = ImageTransform(cfg.transform.image_size, cfg.transform.center_crop, normalize)
        train_set = instantiate(cfg.dataset, split="train", transform=transform, seed=cfg.seed)
        test_set = instantiate(cfg.dataset, split="test", transform=transform, seed=cfg.seed)
        log.info("%s: %d train and %d test images", choices.get("dataset"), len(train_set), len(test_set))
        train_loader = create_dataloader(train_set, cfg.loader.train_batch_size, True, cfg.hardware.num_workers, cfg.seed)
        test_loader = create_dataloader(test_set, cfg.loader.eval_batch_size, False, cfg.hardware.num_workers, cfg.seed)

        engine = OmegaConf.to_container(cfg.trainer, resolve=True)
        trainer.configure_engine(device=device, precision=cfg.hardware.precision, weights_dir=run_dir / "weights", **engine)
        validate = trainer.early_stopping is not None

        started = time.perf_counter()
        trainer.fit(train_loader, test_loader if validate else None)
        fit_s = time.perf_counter() - started
        started = time.perf_counter()
        predictions = trainer.predict(test_loader)
        test_s = time.perf_counter() - started

        masks = predictions["mask"][:, 0] if predictions["has_masks"] else None
        metrics = compute_metrics(predictions["pred_score"], predictions["label"], predictions["anomaly_map"][:, 0],
                                  masks, fpr_limit=cfg.evaluation.aupro_fpr_limit)
        record.update({
            "status": "ok",
            "metrics": {key: metrics[key] for key in METRIC_KEYS},
            "timing": {"fit_s": round(fit_s, 3), "test_s": round(test_s, 3)},
            "resources": read_peak_memory(device),
            "model": trainer.summary(),
            "environment": {"torch": torch.__version__, "device": str(device), "threads": threads,
                            "precision": cfg.hardware.precision},
            "evaluation": {
                "resolution": list(predictions["anomaly_map"].shape[-2:]),
                "image_score": "pred_score of the model (raw, not normalised)",
                "mask_threshold": "mask pixels > 0 are anomalous",
                "aupro_fpr_limit": cfg.evaluation.aupro_fpr_limit,
                "test_images": len(test_set),
                "train_images": len(train_set),
            },
        })
        return record
    except BaseException as error:
        record["status"] = "interrupted" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "failed"
        record["error"] = str(find_user_error(error) or error) or type(error).__name__
        record["traceback"] = traceback.format_exc()
        raise
    finally:
        record["run"]["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json_atomic(run_dir / "metrics.json", record)


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg):
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    experiment = partial(run_experiment, cfg, run_dir, dict(hydra_cfg.runtime.choices), list(hydra_cfg.overrides.task))
    stop_on_sigterm()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # a run already ok is skipped, a failed one is recorded and the sweep goes on
        record = run_sweep_job(experiment, run_dir, cfg.sweep.rerun)
    else:
        record = run_single_job(experiment)
    if record is None:
        return None
    log.info("%s on %s/%s\n%s", record["run"]["model"], record["run"]["dataset"], record["run"]["category"],
             format_metrics_table(record["metrics"], record["timing"]))
    log.info("run folder: %s", run_dir)
    return record["metrics"]["mad"]


if __name__ == "__main__":
    main()
