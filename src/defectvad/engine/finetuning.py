# src/defectvad/engine/finetuning.py
# init_from=<run dir>: the model starts from a finished run's weights and trains on this run's data set.
# Gradient models go on training (finetune.lr_scale, finetune.freeze); one-pass models (memory banks, statistics)
# refit on the new images or extend the parent's memory bank with them (finetune.memory)
import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from defectvad.engine.one_pass_trainer import OnePassTrainer
from defectvad.errors import ConfigError
from defectvad.inference.runs import WEIGHT_FILES, find_run_problems

log = logging.getLogger("defectvad")

MEMORY_CHOICES = ("refit", "extend")
WEIGHT_CHOICES = {"best": "weights/best.safetensors", "last": "weights/last.safetensors"}
# one-pass models whose fitted state keeps no count of the images it came from, so new images cannot be added
NOT_EXTENDABLE = {
    "PadimTrainer": "PaDiM keeps each position's mean and inverse covariance but not the number of images nor the "
                    "covariance they came from, so its Gaussians cannot be combined with new images",
    "DfmTrainer": "DFM keeps its PCA and Gaussian without the number of images they came from, so they cannot be "
                  "combined with new images",
    "DfkdeTrainer": "DFKDE's PCA and feature scaling are fitted on the training images as a whole and its kernel "
                    "points are a sample of them, so new images cannot be added to them",
}


def start_from_parent(cfg, trainer, run):
    # the parent's description goes to run["parent"]; returns the record's finetune block ({} without init_from)
    if cfg.get("init_from") is None:
        return {}
    settings = read_settings(cfg)
    parent_dir = check_parent_folder(cfg.init_from)
    record = json.loads((parent_dir / "metrics.json").read_text())
    parent_cfg = OmegaConf.load(parent_dir / "config.yaml")
    parent = describe_parent(parent_dir, record, parent_cfg)
    check_same_model(cfg, parent_cfg, parent, run)
    weights = choose_weights(parent_dir, settings["weights"])
    load_parent_weights(trainer.model, weights, parent, run)
    parent["weights"] = str(weights.relative_to(parent_dir))
    run["parent"] = parent
    finetune = {"weights": parent["weights"]}
    if isinstance(trainer, OnePassTrainer):
        finetune.update(prepare_one_pass(trainer, settings))
    else:
        finetune.update(prepare_gradient(trainer, settings))
    log.info("fine-tuning from %s (%s, %s %s): %s", parent_dir, parent["model"], parent["dataset"],
             parent["category"], ", ".join(f"{key} {value}" for key, value in finetune.items()))
    return {"finetune": finetune}


def read_settings(cfg):
    settings = OmegaConf.to_container(cfg.get("finetune") or OmegaConf.create({}), resolve=True)
    unknown = sorted(set(settings) - {"weights", "lr_scale", "freeze", "memory"})
    if unknown:
        raise ConfigError(f"finetune.{unknown[0]} is not a fine-tuning setting; they are: weights, lr_scale, freeze, "
                          f"memory")
    settings = {"weights": None, "lr_scale": 1.0, "freeze": [], "memory": "refit", **settings}
    if settings["weights"] not in (None, *WEIGHT_CHOICES):
        raise ConfigError(f"finetune.weights must be best, last or null (best when the parent kept one, else last); "
                          f"got {settings['weights']!r}")
    scale = settings["lr_scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ConfigError(f"finetune.lr_scale must be a number > 0 that multiplies the model's learning rates, "
                          f"e.g. 0.1; got {scale!r}")
    freeze = settings["freeze"] or []
    if isinstance(freeze, str):
        freeze = [freeze]
    if not isinstance(freeze, list) or not all(isinstance(name, str) and name for name in freeze):
        raise ConfigError(f"finetune.freeze must be a list of module names, e.g. "
                          f"finetune.freeze=[student_model.feature_extractor.layer1]; got {freeze!r}")
    settings["freeze"] = freeze
    if settings["memory"] not in MEMORY_CHOICES:
        raise ConfigError(f"finetune.memory must be one of: {', '.join(MEMORY_CHOICES)}; got {settings['memory']!r}")
    return settings


def check_parent_folder(init_from):
    folder = Path(str(init_from)).expanduser()
    problems = find_run_problems(folder)
    if problems:
        raise ConfigError(f"init_from={init_from} is not a finished run folder ({'; '.join(problems)}); give the "
                          f"folder of a run that ended with status ok (its metrics.json, config.yaml and weights/)")
    return folder.resolve()


def describe_parent(parent_dir, record, parent_cfg):
    run = record.get("run", {})
    return {"path": str(parent_dir), "model": run.get("model"), "backbone": run.get("backbone"),
            "dataset": run.get("dataset"), "category": run.get("category"), "image_size": run.get("image_size"),
            "seed": run.get("seed"), "git_commit": run.get("git_commit"), "target": parent_cfg.model.get("_target_"),
            "metrics": record.get("metrics")}


def check_same_model(cfg, parent_cfg, parent, run):
    target = cfg.model.get("_target_")
    if parent["target"] != target:
        raise ConfigError(f"init_from={parent['path']} is a {parent['model']} run ({parent['target']}), but this run "
                          f"is {run.get('model')} ({target}); fine-tune with model={parent['model']}")


def choose_weights(parent_dir, choice):
    # null: the weights the parent's metrics come from (best when early stopping kept one), as tools/predict.py
    names = [WEIGHT_CHOICES[choice]] if choice else list(WEIGHT_FILES)
    for name in names:
        if (parent_dir / name).is_file():
            return parent_dir / name
    raise ConfigError(f"init_from={parent_dir} has no {names[0]} (finetune.weights={choice}); the parent kept: "
                      f"{', '.join(name for name in WEIGHT_FILES if (parent_dir / name).is_file())}")


def load_parent_weights(model, path, parent, run):
    try:
        stored = load_file(str(path))
    except Exception as error:
        raise ConfigError(f"cannot read the parent's weights {path}: {error}") from error
    own = model.state_dict()
    here = f"this run: backbone {run.get('backbone')}, image size {run.get('image_size')}"
    there = f"the parent: backbone {parent['backbone']}, image size {parent['image_size']}"
    for name, value in own.items():
        if name not in stored:
            raise ConfigError(f"the parent's weights {path} do not fit this model: they have no tensor {name} "
                              f"({there}; {here}); fine-tune with the parent's backbone and model settings")
        # a buffer that starts empty (a memory bank, a fitted Gaussian) takes the stored shape
        if value.numel() and tuple(value.shape) != tuple(stored[name].shape):
            raise ConfigError(f"the parent's weights {path} do not fit this model: {name} has shape "
                              f"{list(stored[name].shape)} there and {list(value.shape)} here ({there}; {here}); "
                              f"fine-tune with the parent's backbone, input size and model settings")
    extra = [name for name in stored if name not in own]
    if extra:
        raise ConfigError(f"the parent's weights {path} do not fit this model: this model has no tensor {extra[0]} "
                          f"({there}; {here}); fine-tune with the parent's backbone and model settings")
    try:
        model.load_state_dict(stored)
    except RuntimeError as error:
        raise ConfigError(f"the parent's weights {path} do not fit this model: {str(error).splitlines()[-1].strip()}"
                          ) from error


def prepare_one_pass(trainer, settings):
    name = type(trainer).__name__
    if settings["freeze"] or settings["lr_scale"] != 1:
        raise ConfigError(f"{name} learns nothing by gradient (its training is one pass that fits its memory or "
                          f"statistics): finetune.freeze and finetune.lr_scale do not apply; choose "
                          f"finetune.memory=refit or extend")
    if settings["memory"] == "refit":
        # the training pass replaces the loaded bank or statistics; the feature extractor is the parent's
        return {"memory": "refit"}
    check_extendable(trainer)
    return {"memory": "extend", "memory_bank": extend_memory_bank(trainer)}


def check_extendable(trainer):
    name = type(trainer).__name__
    if name in NOT_EXTENDABLE:
        raise ConfigError(f"finetune.memory=extend: {NOT_EXTENDABLE[name]}; use finetune.memory=refit")
    if trainer.learning_type == "zero_shot":
        raise ConfigError(f"finetune.memory=extend: {name} is zero-shot and builds its memory from the test images; "
                          f"use finetune.memory=refit")
    if "memory_bank" not in dict(trainer.model.named_buffers()):
        raise ConfigError(f"finetune.memory=extend: {name} keeps no memory bank to extend; use finetune.memory=refit")
    if trainer.model.memory_bank.shape[0] == 0:
        raise ConfigError(f"finetune.memory=extend: the parent's memory bank is empty; use finetune.memory=refit")


def extend_memory_bank(trainer):
    # the bank fitted on the new images (coreset-subsampled by the model's own rule, as a fresh fit would) is
    # appended to the parent's bank as stored; the parent's part, already subsampled once, is not subsampled again
    parent_bank = trainer.model.memory_bank.detach().clone()
    sizes = {"parent": int(parent_bank.shape[0]), "new": None, "total": None}
    fit = trainer.on_train_epoch_end

    def fit_and_extend():
        fit()
        new = trainer.model.memory_bank
        if new.shape[1:] != parent_bank.shape[1:]:
            raise ConfigError(f"finetune.memory=extend: the parent's bank holds features of shape "
                              f"{list(parent_bank.shape[1:])} and this run's {list(new.shape[1:])}; fine-tune with "
                              f"the parent's layers and backbone")
        trainer.model.memory_bank = torch.cat((parent_bank.to(new.device, new.dtype), new))
        sizes.update(new=int(new.shape[0]), total=int(trainer.model.memory_bank.shape[0]))

    trainer.on_train_epoch_end = fit_and_extend
    return sizes


def prepare_gradient(trainer, settings):
    if settings["memory"] != "refit":
        raise ConfigError(f"finetune.memory=extend applies to memory-bank models (one-pass training); "
                          f"{type(trainer).__name__} trains by gradient: leave finetune.memory=refit")
    frozen = freeze_modules(trainer, settings["freeze"])
    wrap_optimizer_setup(trainer, settings["lr_scale"], settings["freeze"])
    return {"lr_scale": settings["lr_scale"], "freeze": settings["freeze"], "frozen_parameters": frozen}


def freeze_modules(trainer, prefixes):
    # each name is a module's dotted name (student_model.feature_extractor.layer1) and takes everything under it;
    # frozen modules keep their parameters and run in eval mode, so their BatchNorm statistics stay the parent's too
    model = trainer.model
    modules = dict(model.named_modules())
    chosen = []
    for prefix in prefixes:
        if prefix not in modules or not prefix:
            raise ConfigError(f"finetune.freeze: {prefix!r} names no module of {type(model).__name__}; its top-level "
                              f"modules are: {list_children(model)}{describe_nearest(modules, prefix)}")
        chosen.append(modules[prefix])
    count = 0
    for module in chosen:
        for parameter in module.parameters():
            if parameter.requires_grad:
                parameter.requires_grad_(False)
                count += parameter.numel()
    if chosen:
        epoch_start = trainer.on_train_epoch_start

        def keep_frozen_in_eval():
            # after the loop's model.train() and the model's own epoch start
            epoch_start()
            for module in chosen:
                module.eval()

        trainer.on_train_epoch_start = keep_frozen_in_eval
    return count


def list_children(module):
    return ", ".join(name for name, _ in module.named_children()) or "none"


def describe_nearest(modules, name):
    # the deepest module on the way to a wrong dotted name, and its children
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        found = ".".join(parts[:end])
        if found in modules:
            return f"; those of {found} are: {list_children(modules[found])}"
    return ""


def wrap_optimizer_setup(trainer, lr_scale, freeze):
    setup = trainer.setup_optimizers

    def setup_then_adjust():
        setup()
        if trainer.optimizer is None:
            return
        trained = [p for group in trainer.optimizer.param_groups for p in group["params"] if p.requires_grad]
        if freeze and not trained:
            raise ConfigError(f"finetune.freeze={freeze} freezes every parameter {type(trainer).__name__}'s optimizer "
                              f"trains; nothing would learn: freeze fewer modules")
        if lr_scale != 1:
            # several optimizers stepped as one (GLASS's OptimizerGroup) are scaled each
            for optimizer in getattr(trainer.optimizer, "optimizers", [trainer.optimizer]):
                scale_learning_rates(optimizer, lr_scale)

    trainer.setup_optimizers = setup_then_adjust


def scale_learning_rates(optimizer, scale):
    # each step uses scale x the scheduled rate; the rate is put back after the step, so every scheduler (closed
    # form, chained or the model's own) runs on the rates it set
    kept = []

    def scale_before(optimizer, args, kwargs):
        kept[:] = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * scale

    def restore_after(optimizer, args, kwargs):
        for group, lr in zip(optimizer.param_groups, kept):
            group["lr"] = lr

    optimizer.register_step_pre_hook(scale_before)
    optimizer.register_step_post_hook(restore_after)
