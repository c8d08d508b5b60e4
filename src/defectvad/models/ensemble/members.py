# src/defectvad/models/ensemble/members.py
# the ensemble's members: finished runs rebuilt from their folders (tools/predict.py's TrainedRun), checked
# before any work, and how each one takes the ensemble's input
from pathlib import Path

from torch.nn import functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from defectvad.errors import ConfigError

MIN_MEMBERS, MAX_MEMBERS = 2, 4


def check_member_count(members):
    if isinstance(members, (str, Path)) or not members or not MIN_MEMBERS <= len(members) <= MAX_MEMBERS:
        raise ConfigError(f"model.members must list {MIN_MEMBERS} to {MAX_MEMBERS} run folders, e.g. "
                          f"model.members=[multirun/a/run1,multirun/a/run2]; got {members!r}")


def check_member_folders(members):
    from defectvad.inference.runs import find_run_problems

    check_member_count(members)
    folders = [Path(str(member)).expanduser().resolve() for member in members]
    if len(set(folders)) < len(folders):
        raise ConfigError(f"model.members names a run folder twice: {', '.join(map(str, folders))}")
    bad = [f"{folder} ({'; '.join(problems)})" for folder in folders for problems in [find_run_problems(folder)]
           if problems]
    if bad:
        raise ConfigError(f"ensemble member not usable: {', '.join(bad)}; each member must be the folder of a run "
                          f"that finished with status ok (metrics.json, config.yaml, weights/), or a model config name "
                          f"(conf/model/<name>.yaml) to train in this run")
    return folders


def describe_data(run):
    # what a member was trained on: data set, category and the data set's root folder
    cfg = run.cfg.dataset
    return {"dataset": run.record["run"].get("dataset"), "category": run.record["run"].get("category"),
            "root": str(cfg.get("root"))}


def check_same_data(runs, allow_mixed):
    found = [describe_data(run) for run in runs]
    if allow_mixed or all(data == found[0] for data in found):
        return
    listed = "; ".join(f"{run.run_dir}: {data['dataset']}/{data['category']} at {data['root']}"
                       for run, data in zip(runs, found))
    raise ConfigError(f"ensemble members were trained on different data sets ({listed}); use members of one data "
                      f"set and category, or set model.allow_mixed=true")


def check_member_input(run):
    if run.cfg.transform.get("center_crop") is not None:
        raise ConfigError(f"ensemble member {run.run_dir} centre-crops its input (transform.center_crop="
                          f"{run.cfg.transform.center_crop}), which the ensemble does not undo on its maps; use "
                          f"members trained with transform.center_crop=null")
    if run.tiler is not None:
        raise ConfigError(f"ensemble member {run.run_dir} is a tiled run (tiling.tile_size="
                          f"{run.cfg.tiling.tile_size}); an ensemble gives each member whole images: use members "
                          f"trained without tiling")
    if getattr(run.model, "batch_level", False) or not run.trainer.tileable:
        raise ConfigError(f"ensemble member {run.run_dir} scores the test set as a whole ({run.name}); an ensemble "
                          f"needs members that score each image on its own")


def load_members(members, allow_mixed=False):
    from defectvad.inference.runs import TrainedRun

    runs = [TrainedRun(folder, "cpu") for folder in check_member_folders(members)]
    check_same_data(runs, allow_mixed)
    for run in runs:
        check_member_input(run)
    return runs


class MemberInput:
    # the ensemble's input (pixels in [0, 1] at the ensemble's size) as the member was trained to see it:
    # resized to its size with its interpolation, normalised when it normalises
    def __init__(self, transform, normalize):
        self.size = list(transform.image_size) if not isinstance(transform.image_size, int) else \
            [transform.image_size] * 2
        self.interpolation = InterpolationMode(transform.interpolation)
        self.mean, self.std = list(transform.mean), list(transform.std)
        self.normalize = normalize

    def __call__(self, images):
        if list(images.shape[-2:]) != self.size:
            images = TF.resize(images, self.size, self.interpolation, antialias=True)
        return TF.normalize(images, self.mean, self.std) if self.normalize else images


def resample_map(anomaly_map, size):
    if tuple(anomaly_map.shape[-2:]) == tuple(size):
        return anomaly_map
    return F.interpolate(anomaly_map, size=tuple(size), mode="bilinear", align_corners=False)


def find_fitted_paths(run):
    # the images the member was fitted on: its train split less its held-out images, and its k_shot
    from defectvad.experiment import build_train_sets

    k_shot = (run.record.get("evaluation") or {}).get("k_shot")
    train_set, _ = build_train_sets(run.cfg, None, k_shot, True)
    return {str(Path(sample["image_path"]).resolve()) for sample in train_set.samples}


def check_holdout(runs, holdout_set, allow_mixed):
    # the calibration images must be normal images no member was fitted on, and (unless mixed members are
    # allowed) normal training images of the members' data set
    from defectvad.data.categories import build_dataset

    held = {str(Path(sample["image_path"]).resolve()) for sample in holdout_set.samples}
    for run in runs:
        seen = held & find_fitted_paths(run)
        if seen:
            raise ConfigError(f"{len(seen)} of the ensemble's {len(held)} held-out normal images were used to fit "
                              f"member {run.run_dir}; give the ensemble the members' own evaluation.holdout="
                              f"{run.cfg.evaluation.holdout} and seed={run.cfg.seed} (tools/ensemble.py writes them)")
        if allow_mixed:
            continue
        train = build_dataset(run.cfg.dataset, split="train", transform=None, seed=run.cfg.seed)
        foreign = held - {str(Path(sample["image_path"]).resolve()) for sample in train.samples}
        if foreign:
            raise ConfigError(f"the ensemble runs on other data than member {run.run_dir} was trained on "
                              f"({describe_data(run)['dataset']}/{describe_data(run)['category']}); run it on the "
                              f"members' data set, or set model.allow_mixed=true")
