# src/defectvad/models/ensemble/member_runs.py
# members given as model configs rather than run folders (model.members=[padim,'fastflow trainer.max_epochs=5',
# <run folder>]) are trained first, each as a run of its own in <run dir>/members/<n>-<model>, composed from the
# ensemble run's overrides (its data set, seed, holdout, backbone, size...) less those of the model and the
# experiment preset, plus `model=<name>` and the entry's own overrides; the ensemble then takes their folders
import difflib
import logging
import shlex
from pathlib import Path

from omegaconf import open_dict

from defectvad.errors import ConfigError

log = logging.getLogger("defectvad")
MEMBER_FOLDER = "members"


def find_member_configs(members, repo_dir):
    # {index: (model name, the entry's own overrides)} for the entries that name a model config, not a folder
    found = {}
    for index, entry in enumerate(members):
        entry = str(entry)
        if Path(entry).expanduser().exists():
            continue
        words = shlex.split(entry)
        if not words or not (Path(repo_dir) / "conf" / "model" / f"{words[0]}.yaml").is_file():
            continue
        if words[0] == "ensemble":
            raise ConfigError(f"model.members: '{entry}' is an ensemble; an ensemble's members are single models")
        found[index] = (words[0], words[1:])
    return found


def check_member_folders_first(members, configs, repo_dir):
    # before any member is trained: as many members as an ensemble takes, every other entry a usable run folder
    from defectvad.inference.runs import find_run_problems
    from defectvad.models.ensemble.members import check_member_count

    check_member_count(members)
    names = sorted(path.stem for path in (Path(repo_dir) / "conf" / "model").glob("*.yaml"))
    for index, entry in enumerate(members):
        problems = [] if index in configs else find_run_problems(Path(str(entry)).expanduser())
        if problems:
            close = difflib.get_close_matches(str(entry).split(" ")[0], names, n=1)
            guess = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"model.members: '{entry}' is neither a usable run folder ({'; '.join(problems)}) nor "
                              f"a model config{guess}; model configs: {', '.join(names)}")


def is_model_override(override):
    key = override.split("=", 1)[0].lstrip("+~")
    return key in ("model", "experiment") or key.startswith(("model.", "model@", "experiment@"))


def compose_member(name, overrides):
    from hydra import compose

    try:
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception as error:
        raise ConfigError(f"ensemble member {name} ({' '.join(overrides)}): {error}") from error
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]
        # the folder belongs to this ensemble run, which is starting (again): an earlier member run there goes
        cfg.overwrite = True
    return cfg, choices


def train_member_configs(cfg, run_dir, overrides, repo_dir, run_member):
    # trains the members given as configs, puts their folders into cfg.model.members; True when there were any
    members = cfg.model.get("members")
    if members is None or isinstance(members, str):
        return False
    configs = find_member_configs(members, repo_dir)
    if not configs:
        return False
    check_member_folders_first(members, configs, repo_dir)
    folders = [str(member) for member in members]
    shared = [override for override in overrides if not is_model_override(override)]
    for index, (name, extra) in configs.items():
        member_overrides = [*shared, f"model={name}", *extra]
        member_cfg, choices = compose_member(name, member_overrides)
        member_dir = Path(run_dir) / MEMBER_FOLDER / f"{index + 1}-{name}"
        member_dir.mkdir(parents=True, exist_ok=True)
        log.info("ensemble member %d of %d: training %s in %s", index + 1, len(members), name, member_dir)
        run_member(member_cfg, member_dir, choices, member_overrides, repo_dir)
        folders[index] = str(member_dir)
    cfg.model.members = folders
    return True
