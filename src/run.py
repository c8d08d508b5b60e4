# src/run.py
import logging
import os
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DEFECTVAD_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402

from defectvad.engine.resources import fix_mmap_threshold  # noqa: E402
from defectvad.engine.signals import stop_on_sigterm  # noqa: E402
from defectvad.experiment import run_experiment  # noqa: E402
from defectvad.hydra_errors import explain_hydra_errors  # noqa: E402
from defectvad.records import format_metrics_table  # noqa: E402
from defectvad.sweeps.callbacks import prepare_sweeps  # noqa: E402
from defectvad.sweeps.jobs import run_single_job, run_sweep_job  # noqa: E402

log = logging.getLogger("defectvad")
# a run.log on a full disk drops its lines instead of printing a traceback for each; the run's own message says why
logging.raiseExceptions = False
fix_mmap_threshold()
prepare_sweeps()
explain_hydra_errors()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg):
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    experiment = partial(run_experiment, cfg, run_dir, dict(hydra_cfg.runtime.choices), list(hydra_cfg.overrides.task),
                         ROOT)
    stop_on_sigterm()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # a run already ok is skipped, a failed one is recorded and the sweep goes on
        record = run_sweep_job(partial(experiment, single=False), run_dir, cfg.sweep.rerun)
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
