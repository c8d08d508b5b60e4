# src/defectvad/sweeps/callbacks.py
import logging
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

from hydra.experimental.callback import Callback

from defectvad.atomic_files import read_json, write_json_atomic
from defectvad.errors import OutputError, report_user_error
from defectvad.sweeps.folders import find_runs, register_resolvers, sweep_command

log = logging.getLogger("defectvad.sweeps")
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def prepare_sweeps():
    register_resolvers()
    # conf/hydra/launcher/*.yaml are complete configs that keep the plugins' names on purpose
    warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")


# joblib and submitit job processes import this module when they unpickle the callback, before they
# compose their config and resolve hydra.sweep.dir and hydra.sweep.subdir
prepare_sweeps()


class SweepCallback(Callback):
    def on_multirun_start(self, config, **kwargs):
        sweep_dir = Path(config.hydra.sweep.dir)
        overrides = list(config.hydra.overrides.task)
        self.jobs = list_jobs(config)
        self.before = index_runs(sweep_dir)
        record = read_json(sweep_dir / "sweep.json") or {"name": sweep_dir.name, "invocations": []}
        resumed = bool(record["invocations"])
        record.update(command=sweep_command(overrides), jobs=self.jobs)
        record["invocations"].append({
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "launcher": config.hydra.runtime.choices.get("hydra/launcher"), "overrides": overrides,
        })
        try:
            write_json_atomic(sweep_dir / "sweep.json", record)
        except OutputError as error:
            # nothing can be written there: one message before any run starts (Hydra warns on a callback's error)
            sys.exit(report_user_error(error))
        done = sum(status == "ok" for _, status in self.before.values())
        log.info("%s sweep %s: %s runs, %d already ok", "resuming" if resumed else "starting", sweep_dir,
                 "?" if self.jobs is None else len(self.jobs), done)

    def on_multirun_end(self, config, **kwargs):
        sweep_dir = Path(config.hydra.sweep.dir)
        counts = count_runs(index_runs(sweep_dir), self.before, self.jobs)
        try:
            from defectvad.sweeps.reports import write_report
            write_report([sweep_dir], sweep_dir)
            log.info("results: %s", sweep_dir / "results.md")
        except Exception:
            log.exception("results.md not written; try python tools/aggregate.py %s", sweep_dir)
        log.info("sweep %s: %s", sweep_dir.name,
                 ", ".join(f"{count} {state}" for state, count in counts.items() if count or state != "not run"))
        if counts["failed"] or counts["not run"]:
            sys.exit(1)


def list_jobs(config):
    # the runs Hydra's basic sweeper launches and their folders, so that one that never started is reported
    if config.hydra.sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not GlobalHydra.instance().is_initialized():
        return None
    loader = GlobalHydra.instance().config_loader()
    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    try:
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + list(config.hydra.overrides.task))
        jobs = [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
        # composed as the launcher composes them, for the folder each run will write
        return [{"folder": str(loader.load_sweep_config(config, job).hydra.sweep.subdir), "overrides": job}
                for job in jobs]
    except Exception:
        return None


def index_runs(sweep_dir):
    # run folder (relative to the sweep) -> (metrics.json's modification time, status)
    return {str(path.parent.relative_to(sweep_dir)): (path.stat().st_mtime_ns, (record or {}).get("status"))
            for path, record in find_runs(sweep_dir)}


def count_runs(after, before, jobs):
    counts = {"ok": 0, "skipped": 0, "failed": 0, "not run": 0}
    for folder in list(after) if jobs is None else [job["folder"] for job in jobs]:
        if folder not in after:
            counts["not run"] += 1
        elif before.get(folder) == after[folder]:
            # metrics.json untouched by this start of the sweep
            counts["skipped" if after[folder][1] == "ok" else "not run"] += 1
        else:
            counts["ok" if after[folder][1] == "ok" else "failed"] += 1
    return counts
