# src/defectvad/experiment.py
# one run, top to bottom: check, build, fit, evaluate, record
import csv
import io
import logging
import time

from hydra.utils import instantiate
from omegaconf import OmegaConf

from defectvad.atomic_files import write_text_atomic
from defectvad.engine.config_checks import check_config
from defectvad.engine.resources import read_peak_memory
from defectvad.engine.run_folders import clear_run_folder, lock_run_folder
from defectvad.engine.run_record import keep_run_record
from defectvad.errors import ConfigError
from defectvad.models.ensemble.member_runs import train_member_configs
from defectvad.records import METRIC_KEYS, read_git_commit

log = logging.getLogger("defectvad")

LEARNING_TYPES = ("one_class", "few_shot", "zero_shot")
VALIDATION_SPLITS = {"test": "test (optimistic)", "holdout": "holdout (normal images + synthetic anomalies)"}


def run_experiment(cfg, run_dir, choices, overrides, repo_dir, single=True):
    # single: a single run, whose folder may hold an earlier run (a sweep's skip and rerun rules manage its own)
    with lock_run_folder(run_dir):
        if single:
            clear_run_folder(run_dir, cfg.get("overwrite", False))
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        with keep_run_record(run_dir / "metrics.json", describe_run(cfg, run_dir, choices, overrides,
                                                                    repo_dir)) as record:
            device, weights_path = check_run(cfg)
            if train_member_configs(cfg, run_dir, overrides, repo_dir, run_experiment):
                # the ensemble as it will be rebuilt: its members' folders; its own threads and seed again
                write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
                prepare_process(cfg)
            trainer = build_trainer(cfg, run_dir, device, weights_path)
            record.update(start_from_parent(cfg, trainer, record["run"]))
            data = build_data(cfg, trainer, choices.get("dataset"))
            fit_s, best_weights = fit_model(trainer, data)
            predictions, metrics, thresholds, test_s = evaluate_model(cfg, trainer, data)
            record.update(summarize_run(cfg, trainer, data, predictions, metrics, thresholds, device,
                                        {"fit_s": round(fit_s, 3), "test_s": round(test_s, 3)}, best_weights))
            record["grading"] = grade_test_images(cfg, run_dir, data, predictions, thresholds, weights_path, device)
            write_outputs(cfg, run_dir, trainer, data, predictions, record, device)
    return record


def describe_run(cfg, run_dir, choices, overrides, repo_dir):
    return {
        "status": "running",
        "run": {
            "model": choices.get("model"), "backbone": cfg.backbone.name, "dataset": choices.get("dataset"),
            "category": describe_category(cfg.dataset.get("category")), "seed": cfg.seed,
            "image_size": describe_size(cfg.transform.image_size),
            "overrides": overrides, "git_commit": read_git_commit(repo_dir), "run_dir": str(run_dir),
        },
    }


def describe_category(category):
    # one category, all, or a list of them (one model for several categories)
    return OmegaConf.to_object(category) if OmegaConf.is_config(category) else category


def describe_size(size):
    # as given (a bad value is recorded, then check_run names it); one integer is a square
    size = OmegaConf.to_object(size) if OmegaConf.is_config(size) else size
    return [size, size] if isinstance(size, int) and not isinstance(size, bool) else size


def check_run(cfg):
    # cheap checks first: a wrong setting (before torch is even imported) or a missing weights file stops the run
    # before any data or model work
    check_config(cfg)
    from defectvad.backbones.weights import resolve_weights, verify_weights
    from defectvad.engine.devices import check_precision, resolve_device

    device = resolve_device(cfg.hardware.accelerator)
    check_precision(cfg.hardware.precision)
    weights_path = None
    if cfg.backbone.pretrained:
        weights_path = resolve_weights(cfg.backbone.name, cfg.paths.backbone_dir, cfg.backbone.weights)
        verify_weights(weights_path)
    prepare_process(cfg)
    check_lpips(cfg)
    return device, weights_path


def prepare_process(cfg):
    from defectvad.engine.devices import set_threads
    from defectvad.engine.seeding import seed_everything

    set_threads(cfg.hardware.threads)
    seed_everything(cfg.seed)


def check_lpips(cfg):
    # evaluation.lpips=<net> needs its two files before any work
    from defectvad.metrics.lpips import choose_lpips_net

    choose_lpips_net(cfg.evaluation.get("lpips"), cfg.paths.backbone_dir)


def build_trainer(cfg, run_dir, device, weights_path):
    from defectvad.engine.positions import build_trainer_for_tiling
    from defectvad.engine.tiling import create_tiler, tiled_model_settings

    size = cfg.transform.center_crop or cfg.transform.image_size
    tiler = create_tiler(cfg.get("tiling"), size)
    trainer = build_trainer_for_tiling(
        lambda: instantiate(cfg.model, backbone=cfg.backbone.name, weights_path=weights_path, _convert_="all",
                            **tiled_model_settings(cfg, tiler)), cfg.get("tiling"), tiler, size)
    if trainer.learning_type not in LEARNING_TYPES:
        raise ConfigError(f"{type(trainer).__name__}.learning_type is '{trainer.learning_type}'; "
                          f"it must be one of: {', '.join(LEARNING_TYPES)}")
    engine = OmegaConf.to_container(cfg.trainer, resolve=True)
    engine.pop("validation", None)  # which split validates is the run's choice (build_data), not the loop's
    trainer.configure_engine(device=device, precision=cfg.hardware.precision, weights_dir=run_dir / "weights",
                             **engine)
    if tiler is not None:
        trainer.configure_tiling(tiler, cfg.tiling.batch_size or cfg.loader.eval_batch_size, cfg.tiling.image_score)
    return trainer


def start_from_parent(cfg, trainer, run):
    # init_from=<run dir>: the parent's weights, then this run's data (engine/finetuning.py)
    from defectvad.engine.finetuning import start_from_parent

    return start_from_parent(cfg, trainer, run)


def build_data(cfg, trainer, dataset_name):
    from defectvad.data.categories import build_dataset
    from defectvad.data.loaders import create_dataloader
    from defectvad.data.transforms import create_transform

    normalize = trainer.normalize_input if cfg.transform.normalize is None else cfg.transform.normalize
    transform = create_transform(cfg.transform, cfg.backbone.name, normalize)
    k_shot = resolve_k_shot(trainer, cfg.dataset.get("k_shot"))
    train_set, holdout_set = build_train_sets(cfg, transform, k_shot, trainer.learning_type != "zero_shot")
    test_set = build_dataset(cfg.dataset, split="test", transform=transform, seed=cfg.seed)
    validation_set, validation_split = build_validation_set(cfg, trainer, test_set, holdout_set)
    counts = {"train_images": 0 if train_set is None else len(train_set),
              "holdout_images": 0 if holdout_set is None else len(holdout_set), "test_images": len(test_set)}
    log.info("%s: %d train (%s), %d held-out normal and %d test images", dataset_name, counts["train_images"],
             trainer.learning_type, counts["holdout_images"], counts["test_images"])

    # a tiled run evaluates one image at a time (its tiles in batches of tiling.batch_size)
    eval_batch_size = 1 if trainer.tiler is not None else cfg.loader.eval_batch_size

    def loader(dataset, batch_size=eval_batch_size, shuffle=False):
        if dataset is None:
            return None
        return create_dataloader(dataset, batch_size, shuffle, cfg.hardware.num_workers, cfg.seed)

    return {"train": build_train_loader(cfg, trainer, train_set, loader), "test": loader(test_set),
            "holdout": loader(holdout_set), "validation": loader(validation_set), "test_set": test_set,
            "validation_split": validation_split, "k_shot": k_shot, "counts": counts}


def build_train_loader(cfg, trainer, train_set, loader):
    # a tiled run trains on batches of tiles, cut from as few images as fill one
    from defectvad.engine.tiling import TiledLoader, images_per_tile_batch

    if train_set is None or trainer.tiler is None or getattr(trainer, "per_position", False):
        # per-position models take their tiles from batches of images
        return loader(train_set, cfg.loader.train_batch_size, True)
    images = images_per_tile_batch(trainer.tiler, cfg.transform.center_crop or cfg.transform.image_size,
                                   cfg.loader.train_batch_size)
    return TiledLoader(loader(train_set, images, True), trainer.tiler, cfg.loader.train_batch_size, cfg.seed)


def resolve_k_shot(trainer, k_shot):
    # one-class: k_shot (null: every normal image); few-shot: k_shot or the model's default; zero-shot: none
    name = type(trainer).__name__
    if trainer.learning_type == "zero_shot":
        if k_shot:
            log.warning("%s is zero-shot and uses no training images: dataset.k_shot=%s is ignored", name, k_shot)
        return None
    if k_shot == 0:
        raise ConfigError(f"{name} is {trainer.learning_type.replace('_', '-')} and needs training images: "
                          f"dataset.k_shot=0 leaves none; set it to 1 or more, or null")
    if trainer.learning_type == "few_shot" and k_shot is None:
        if trainer.default_k_shot is None:
            raise ConfigError(f"{name} is a few-shot model: set dataset.k_shot to the number of normal reference "
                              f"images, e.g. dataset.k_shot=4")
        log.info("%s is few-shot: %d reference images (the model's default; dataset.k_shot sets another)",
                 name, trainer.default_k_shot)
        return trainer.default_k_shot
    return k_shot


def build_train_sets(cfg, transform, k_shot, learns):
    # (training set or None, held-out normal set or None); a zero-shot model builds no train split unless
    # normal images are held out for a threshold; the k reference images never include held-out ones
    from defectvad.data.base import select_k_shot
    from defectvad.data.categories import build_dataset
    from defectvad.data.holdout import split_holdout

    holdout = cfg.evaluation.holdout
    held_out_split = cfg.dataset.get("held_out_split")
    if held_out_split:
        # the data set's own normal images that no training sees (MVTec AD 2's and MVTec LOCO's validation/good)
        if holdout:
            raise ConfigError(f"dataset.held_out_split={held_out_split} and evaluation.holdout={holdout} both choose "
                              f"held-out normal images; set evaluation.holdout=0 or dataset.held_out_split=null")
        held_out = build_dataset(cfg.dataset, split=held_out_split, transform=transform, seed=cfg.seed)
        train_set = build_dataset(cfg.dataset, split="train", transform=transform, seed=cfg.seed, k_shot=k_shot)
        return (train_set if learns else None), held_out
    if not learns and not holdout:
        return None, None
    train_set = build_dataset(cfg.dataset, split="train", transform=transform, seed=cfg.seed,
                              k_shot=None if holdout else k_shot)
    train_set, holdout_set = split_holdout(train_set, holdout, cfg.seed)
    if holdout and k_shot is not None:
        train_set.samples = select_k_shot(train_set.samples, k_shot, cfg.seed, train_set.describe_location())
    return (train_set if learns else None), holdout_set


def build_validation_set(cfg, trainer, test_set, holdout_set):
    # early stopping's split: the test split (optimistic: the epoch is chosen on the images it is judged on)
    # or held-out normal images with synthetic anomalies pasted into a copy of each
    from defectvad.engine.synthetic_validation import SyntheticAnomalySet

    validation = cfg.trainer.get("validation", "test")
    if validation not in VALIDATION_SPLITS:
        raise ConfigError(f"trainer.validation must be one of: {', '.join(VALIDATION_SPLITS)}; got '{validation}'")
    if trainer.early_stopping is None or trainer.learning_type == "zero_shot":
        return None, None
    if validation == "test":
        return test_set, VALIDATION_SPLITS["test"]
    if holdout_set is None:
        raise ConfigError("trainer.validation=holdout validates on held-out normal images: set evaluation.holdout "
                          "to how many to keep out of training, e.g. evaluation.holdout=20")
    return SyntheticAnomalySet(holdout_set, cfg.seed), VALIDATION_SPLITS["holdout"]


def fit_model(trainer, data):
    # with early stopping, the reported metrics and later predictions use the best epoch's weights
    started = time.perf_counter()
    trainer.holdout_loader = data["holdout"]
    trainer.fit(data["train"], data["validation"])
    best_weights = trainer.load_best_weights()
    return time.perf_counter() - started, best_weights


def evaluate_model(cfg, trainer, data):
    from defectvad.metrics.evaluation import compute_metrics
    from defectvad.metrics.thresholds import fit_thresholds

    started = time.perf_counter()
    trainer.prepare(data["test"])
    sink, stored_size = create_pixel_sink(cfg, trainer, data["test_set"])
    meter = create_reconstruction_meter(cfg, trainer)
    predictions = trainer.predict(data["test"], pixel_sink=sink, stored_size=stored_size, observe=meter)
    test_s = time.perf_counter() - started
    masks = predictions["mask"][:, 0] if predictions["has_masks"] else None
    fpr_limit = cfg.evaluation.aupro_fpr_limit
    histogram = sink.total if sink is not None and masks is not None else None
    metrics = compute_metrics(predictions["pred_score"], predictions["label"], predictions["anomaly_map"][:, 0],
                              masks, fpr_limit=fpr_limit, pixel_histogram=histogram)
    if "category" in data["test_set"].samples[0]:
        metrics = add_category_metrics(metrics, predictions, data["test_set"].samples, fpr_limit,
                                       None if histogram is None else sink.categories)
    # metrics of a data set's own protocol (MVTec LOCO's sPRO, Real-IAD's per-object scores)
    extra_metrics = getattr(data["test_set"], "compute_extra_metrics", None)
    if extra_metrics is not None:
        metrics["extra"] = extra_metrics(predictions, cfg.evaluation.get("full_resolution", False))
    holdout = None if data["holdout"] is None else trainer.predict(data["holdout"], stored_size=stored_size)
    thresholds = fit_thresholds(metrics, predictions["anomaly_map"], holdout, cfg.evaluation.normal_quantile,
                                predictions["label"])
    predictions["holdout"] = holdout
    if meter is not None and meter.count:
        metrics["reconstruction"] = meter.summary()
    return predictions, metrics, thresholds, test_s


def grade_test_images(cfg, run_dir, data, predictions, thresholds, weights_path, device):
    # severity, type and location (grading.json, regions.csv); a failure here is recorded and leaves the run ok
    from defectvad.grading.run_grading import check_grading, grade_run

    if not cfg.get("grading") or not cfg.grading.enabled:
        return None
    check_grading(cfg.grading)
    try:
        return grade_run(cfg, run_dir, data, predictions, thresholds, weights_path, device)
    except Exception as error:
        log.warning("grading not done: %s", error)
        return {"error": str(error)}


def create_reconstruction_meter(cfg, trainer):
    # display-quality figures of reconstruction models (autoencoder, VAE, DRAEM), which compare their output with
    # the input image in [0, 1]: not when the inputs are normalised
    from defectvad.metrics.reconstruction import ReconstructionMeter

    normalized = trainer.normalize_input if cfg.transform.normalize is None else cfg.transform.normalize
    if normalized:
        return None
    return ReconstructionMeter(cfg.evaluation.get("lpips"), cfg.paths.backbone_dir)


def create_pixel_sink(cfg, trainer, test_set):
    # tiled or full-resolution runs stream their maps into pixel histograms and keep small copies (the tile's size,
    # or the input size) for thresholds and pictures; other runs keep their maps and judge them exactly
    from defectvad.metrics.streamed_pixels import StreamedPixels

    full_resolution = cfg.evaluation.get("full_resolution", False)
    if full_resolution and cfg.transform.center_crop is not None:
        raise ConfigError("evaluation.full_resolution=true compares maps with the whole original masks, but "
                          "transform.center_crop cuts the border off the map; set transform.center_crop=null")
    if not full_resolution and trainer.tiler is None:
        return None, None
    stored_size = None if trainer.tiler is None else trainer.tiler.tile_size
    return StreamedPixels(test_set, full_resolution), stored_size


def add_category_metrics(metrics, predictions, samples, fpr_limit, histograms=None):
    # one model for several categories: metrics per category and their mean; the F1 thresholds stay those
    # of all the test images together (one threshold for the model)
    from defectvad.metrics.per_category import compute_category_metrics, mean_metrics

    per_category = compute_category_metrics(predictions, samples, fpr_limit, histograms)
    return {**metrics, **mean_metrics(per_category), "per_category": per_category,
            "pooled": {key: metrics[key] for key in METRIC_KEYS}}


def summarize_run(cfg, trainer, data, predictions, metrics, thresholds, device, timing, best_weights):
    import torch

    return {
        "metrics": {key: metrics[key] for key in METRIC_KEYS},
        **describe_categories(metrics),
        **({"reconstruction": metrics["reconstruction"]} if "reconstruction" in metrics else {}),
        **metrics.get("extra", {}),
        "thresholds": thresholds,
        "timing": timing,
        "resources": read_peak_memory(device),
        "model": trainer.summary(),
        "validation": describe_validation(trainer, data["validation_split"], best_weights),
        "environment": {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                        "precision": cfg.hardware.precision},
        "evaluation": {
            **describe_resolution(cfg, trainer, predictions),
            "image_score": "pred_score of the model (raw, not normalised)",
            "mask_threshold": "mask pixels > 0 are anomalous",
            "aupro_fpr_limit": cfg.evaluation.aupro_fpr_limit,
            "learning_type": trainer.learning_type,
            "k_shot": data["k_shot"],
            **data["counts"],
        },
    }


def describe_resolution(cfg, trainer, predictions):
    size = list(predictions["anomaly_map"].shape[-2:])
    if trainer.tiler is not None:
        tiler = trainer.tiler
        size = list(to_pair(cfg.transform.center_crop or cfg.transform.image_size))
        tiling = {"tile_size": list(tiler.tile_size), "stride": list(tiler.stride), "mode": tiler.mode,
                  "image_score": trainer.tile_image_score, "tiles_per_image": tiler.count(size)}
    else:
        tiling = None
    if cfg.evaluation.get("full_resolution", False):
        resolution = "full: each map resized (bilinear) to its image's own size"
    else:
        resolution = size
    streamed = ("pixel histograms of 2^20 score bins, streamed image by image (exact for scores rounded to 12 "
                "significant bits)" if tiling or cfg.evaluation.get("full_resolution", False) else "exact")
    return {"resolution": resolution, "pixel_metrics": streamed, "tiling": tiling}


def to_pair(size):
    from defectvad.data.transforms import to_size_pair

    return to_size_pair(OmegaConf.to_object(size) if OmegaConf.is_config(size) else size, "transform.image_size")


def describe_categories(metrics):
    if "per_category" not in metrics:
        return {}
    return {"metrics_per_category": {name: {key: values[key] for key in METRIC_KEYS}
                                     for name, values in metrics["per_category"].items()},
            "metrics_pooled": metrics["pooled"],
            "metrics_note": "one model for all these categories: metrics is the mean of metrics_per_category; "
                            "metrics_pooled judges all test images together; thresholds are fit on all of them"}


def describe_validation(trainer, split, best_weights):
    stopping = trainer.early_stopping
    if split is None:
        return {"split": None, "weights": "last", "note": "no validation: early stopping is off or nothing is trained"}
    return {"split": split, "monitor": stopping.monitor, "mode": stopping.mode, "best": stopping.best,
            "epochs": trainer.current_epoch, "weights": "best" if best_weights else "last"}


def write_outputs(cfg, run_dir, trainer, data, predictions, record, device):
    # the extra outputs chosen in evaluation: save_scores, efficiency, save_images
    defect_types = {sample["image_path"]: sample["defect_type"] for sample in data["test_set"].samples}
    defect_types = [defect_types.get(path, "unknown") for path in predictions["image_path"]]
    if cfg.evaluation.save_scores:
        categories = {sample["image_path"]: sample.get("category") for sample in data["test_set"].samples}
        categories = [categories.get(path) for path in predictions["image_path"]]
        write_test_scores(run_dir / "test_scores.csv", predictions, defect_types, record["thresholds"],
                          categories if "metrics_per_category" in record else None)
    record["efficiency"] = measure_run_efficiency(cfg, trainer, data["test_set"], device, record["timing"],
                                                  record["resources"])
    if cfg.evaluation.save_images:
        save_run_images(cfg, run_dir / "images", predictions, defect_types, record["thresholds"],
                        read_grades(run_dir, record.get("grading")))


def write_test_scores(path, predictions, defect_types, thresholds, categories=None):
    # the score of every test image, so that a later prediction can be checked against the run; a run over
    # several categories adds each image's category as the last column
    threshold = thresholds["f1_test"]["image"]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["image_path", "defect_type", "label", "pred_score", "predicted_f1_test"]
                    + (["category"] if categories else []))
    labels, scores = predictions["label"].tolist(), predictions["pred_score"].tolist()
    for index, (image_path, defect_type, label, score) in enumerate(zip(predictions["image_path"], defect_types,
                                                                          labels, scores)):
        writer.writerow([image_path, defect_type, int(label), repr(score), int(score >= threshold)]
                        + ([categories[index]] if categories else []))
    write_text_atomic(path, text.getvalue())


def measure_run_efficiency(cfg, trainer, test_set, device, timing, resources):
    # on the first test images; a failure here is recorded and leaves the run ok
    if not cfg.evaluation.efficiency:
        return {"measured": False, "note": "evaluation.efficiency=false", **timing, **resources}
    import torch

    from defectvad.metrics.efficiency import measure_efficiency

    try:
        count = min(len(test_set), cfg.evaluation.efficiency_batch_size)
        if trainer.tiler is not None:
            # a tiled model's forward takes tiles: the figures are per tile
            images = trainer.tiler.tile(test_set[0]["image"].unsqueeze(0))[:count]
        else:
            images = torch.stack([test_set[index]["image"] for index in range(count)])
        # per-position models: one position's model, which every tile goes through one of
        model = getattr(trainer, "efficiency_model", trainer.model)
        figures = measure_efficiency(model, images, device, cfg.hardware.precision,
                                     cfg.evaluation.efficiency_warmup, cfg.evaluation.latency_repeats,
                                     cfg.evaluation.efficiency_batch_size, cfg.evaluation.throughput_repeats)
    except Exception as error:
        log.warning("efficiency not measured: %s", error)
        return {"measured": False, "error": str(error), **timing, **resources}
    return {"measured": True, **figures, **timing, **resources}


def read_grades(run_dir, summary):
    # each test image's level, type and regions, when the run graded them (grading.json)
    import json

    if not summary or "error" in summary or not (run_dir / "grading.json").is_file():
        return None
    return {image["image_path"]: image for image in json.loads((run_dir / "grading.json").read_text())["images"]}


def save_run_images(cfg, folder, predictions, defect_types, thresholds, grades=None):
    from defectvad.data.images import read_image
    from defectvad.data.transforms import create_transform
    from defectvad.visualization.run_images import write_run_images

    from torchvision.transforms.v2 import functional as TF

    display = create_transform(cfg.transform, cfg.backbone.name, False)
    max_pixels = cfg.dataset.get("max_image_pixels")
    # at the size of the kept maps (a tiled run keeps them at the tile's size)
    size = list(predictions["anomaly_map"].shape[-2:])
    try:
        write_run_images(folder, predictions, defect_types, thresholds,
                         lambda path: TF.resize(display(read_image(path, max_pixels))[0], size, antialias=True),
                         cfg.evaluation.images_per_type, grades)
    except Exception as error:
        log.warning("pictures not written to %s: %s", folder, error)
