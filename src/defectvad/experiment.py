# src/defectvad/experiment.py
# one run: weights check, data, model, fit, test, metrics, thresholds, pictures and metrics.json
import csv
import io
import logging
import time
import traceback
from datetime import datetime, timezone

from hydra.utils import instantiate
from omegaconf import OmegaConf

from defectvad.atomic_files import write_json_atomic, write_text_atomic
from defectvad.engine.resources import read_peak_memory
from defectvad.errors import find_user_error
from defectvad.records import METRIC_KEYS, read_git_commit

log = logging.getLogger("defectvad")


def run_experiment(cfg, run_dir, choices, overrides, repo_dir):
    import torch

    from defectvad.backbones.weights import resolve_weights, verify_weights
    from defectvad.data.holdout import split_holdout
    from defectvad.data.loaders import create_dataloader
    from defectvad.data.transforms import ImageTransform
    from defectvad.engine.devices import check_precision, resolve_device, set_threads
    from defectvad.engine.seeding import seed_everything
    from defectvad.metrics.evaluation import compute_metrics
    from defectvad.metrics.thresholds import fit_thresholds

    record = {
        "status": "running",
        "run": {
            "model": choices.get("model"), "backbone": cfg.backbone.name, "dataset": choices.get("dataset"),
            "category": cfg.dataset.get("category"), "seed": cfg.seed, "image_size": list(cfg.transform.image_size),
            "overrides": overrides, "git_commit": read_git_commit(repo_dir), "run_dir": str(run_dir),
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
        train_set, holdout_set = split_holdout(train_set, cfg.evaluation.holdout, cfg.seed)
        holdout_count = 0 if holdout_set is None else len(holdout_set)
        log.info("%s: %d train, %d held-out normal and %d test images", choices.get("dataset"), len(train_set),
                 holdout_count, len(test_set))
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
        holdout = None
        if holdout_set is not None:
            holdout = trainer.predict(create_dataloader(holdout_set, cfg.loader.eval_batch_size, False,
                                                        cfg.hardware.num_workers, cfg.seed))
        thresholds = fit_thresholds(metrics, predictions["anomaly_map"], holdout, cfg.evaluation.normal_quantile)
        timing = {"fit_s": round(fit_s, 3), "test_s": round(test_s, 3)}
        resources = read_peak_memory(device)
        defect_types = {sample["image_path"]: sample["defect_type"] for sample in test_set.samples}
        defect_types = [defect_types.get(path, "unknown") for path in predictions["image_path"]]
        write_test_scores(run_dir / "test_scores.csv", predictions, defect_types, thresholds)
        efficiency = measure_run_efficiency(cfg, trainer, test_set, device, timing, resources)
        if cfg.evaluation.save_images:
            save_run_images(cfg, run_dir / "images", predictions, defect_types, thresholds)
        record.update({
            "status": "ok",
            "metrics": {key: metrics[key] for key in METRIC_KEYS},
            "thresholds": thresholds,
            "timing": timing,
            "resources": resources,
            "efficiency": efficiency,
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
                "holdout_images": holdout_count,
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


def write_test_scores(path, predictions, defect_types, thresholds):
    # the score of every test image, so that a later prediction can be checked against the run
    threshold = thresholds["f1_test"]["image"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["image_path", "defect_type", "label", "pred_score", "predicted_f1_test"])
    labels, scores = predictions["label"].tolist(), predictions["pred_score"].tolist()
    for image_path, defect_type, label, score in zip(predictions["image_path"], defect_types, labels, scores):
        writer.writerow([image_path, defect_type, int(label), repr(score), int(score >= threshold)])
    write_text_atomic(path, text.getvalue())


def measure_run_efficiency(cfg, trainer, test_set, device, timing, resources):
    # on the first test images; a failure here is recorded and leaves the run ok
    if not cfg.evaluation.efficiency:
        return {"measured": False, "note": "evaluation.efficiency=false", **timing, **resources}
    import torch

    from defectvad.metrics.efficiency import measure_efficiency

    try:
        count = min(len(test_set), cfg.evaluation.efficiency_batch_size)
        images = torch.stack([test_set[index]["image"] for index in range(count)])
        figures = measure_efficiency(trainer.model, images, device, cfg.hardware.precision,
                                     cfg.evaluation.efficiency_warmup, cfg.evaluation.latency_repeats,
                                     cfg.evaluation.efficiency_batch_size, cfg.evaluation.throughput_repeats)
    except Exception as error:
        log.warning("efficiency not measured: %s", error)
        return {"measured": False, "error": str(error), **timing, **resources}
    return {"measured": True, **figures, **timing, **resources}


def save_run_images(cfg, folder, predictions, defect_types, thresholds):
    from defectvad.data.images import read_image
    from defectvad.data.transforms import ImageTransform
    from defectvad.visualization.run_images import write_run_images

    display = ImageTransform(cfg.transform.image_size, cfg.transform.center_crop, False)
    try:
        write_run_images(folder, predictions, defect_types, thresholds, lambda path: display(read_image(path))[0],
                         cfg.evaluation.images_per_type)
    except Exception as error:
        log.warning("pictures not written to %s: %s", folder, error)
