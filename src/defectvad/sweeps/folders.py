# src/defectvad/sweeps/folders.py
import hashlib
import re
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from defectvad.atomic_files import read_json

# a run's identity opens its folder name; its other overrides follow
IDENTITY_KEYS = ("model", "backbone", "dataset", "dataset.category", "dataset.k_shot", "seed")
# how a sweep is run and where it writes do not change what its runs compute
SWEEP_OPTIONS = ("sweep.name", "sweep.resume", "sweep.rerun", "overwrite", "paths.output_dir", "paths.multirun_dir")
DROPPED = str.maketrans("", "", "[]{}'\" ")
UNSAFE = re.compile(r"[^\w.,=+~@-]", re.ASCII)
MAX_NAME = 160


def option_key(override):
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]


def sweep_command(overrides):
    # what a sweep started again must share with its first start to resume it
    return sorted(str(o) for o in overrides
                  if option_key(str(o)) not in SWEEP_OPTIONS and not option_key(str(o)).startswith("hydra"))


def run_key(overrides):
    # what a run computes, whichever preset or command started it
    return tuple(o for o in sweep_command(overrides) if option_key(o) != "sweep")


def extra_overrides(overrides):
    return [o for o in run_key(overrides) if option_key(o) not in IDENTITY_KEYS]


def run_folder_name(choices, overrides, category, seed, k_shot=None):
    # k<N>: the number of training images (dataset.k_shot); none when the run takes all of them
    shots = [] if k_shot is None else [f"k{k_shot}"]
    parts = [choices.get("model"), choices.get("backbone"), choices.get("dataset"), category, *shots, f"seed{seed}"]
    raw = "-".join([str(part) for part in parts] + extra_overrides(overrides)).translate(DROPPED)
    name = UNSAFE.sub("_", raw)
    if name != raw or len(name) > MAX_NAME:
        # a short hash keeps apart names that differ only in what was replaced or cut
        name = f"{name[:MAX_NAME]}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
    return name


def category_name(category):
    # a single run's folder: one category as it is, a list of them joined by + (tiles+disc)
    if OmegaConf.is_list(category) or isinstance(category, (list, tuple)):
        return "+".join(str(name) for name in category)
    return str(category)


def find_sweep_name(name, resume, multirun_dir, overrides):
    if name is not None:
        return str(name)
    if resume:
        command = sweep_command(overrides)
        earlier = [path for path in Path(multirun_dir).glob("*/sweep.json")
                   if (read_json(path) or {}).get("command") == command]
        if earlier:
            return max(earlier, key=lambda path: path.stat().st_mtime).parent.name
    return datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")


def register_resolvers():
    # the name is cached: resolved once where the sweep starts, Hydra copies the cache into every job's config
    OmegaConf.register_new_resolver("defectvad.sweep_name", find_sweep_name, use_cache=True, replace=True)
    OmegaConf.register_new_resolver("defectvad.run_folder", run_folder_name, replace=True)
    OmegaConf.register_new_resolver("defectvad.category_name", category_name, replace=True)


def read_run_status(run_dir):
    return (read_json(Path(run_dir) / "metrics.json") or {}).get("status")


def find_runs(folder):
    # a run inside another run's folder (an ensemble's members/) belongs to that run, not to the tables
    folder = Path(folder)
    for path in sorted(folder.rglob("metrics.json")):
        outer = path.parent.relative_to(folder).parents
        if not any((folder / parent / "metrics.json").is_file() for parent in outer):
            yield path, read_json(path)
