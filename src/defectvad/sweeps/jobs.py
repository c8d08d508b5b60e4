# src/defectvad/sweeps/jobs.py
import logging
import os
import sys

from defectvad.engine.resources import release_resources
from defectvad.engine.signals import Terminated
from defectvad.errors import find_user_error
from defectvad.atomic_files import read_json
from defectvad.sweeps.folders import read_run_status

log = logging.getLogger("defectvad")


def run_single_job(experiment):
    # a user mistake ends with its message alone and exit code 1; HYDRA_FULL_ERROR=1 shows the traceback
    try:
        return experiment()
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)
    except Terminated as error:
        log.error("%s", error)
        raise
    except Exception as error:
        user_error = find_user_error(error)
        if user_error is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        log.error("error: %s", user_error)
        sys.exit(1)


def run_sweep_job(experiment, run_dir, rerun):
    # one run of a multirun: a failure is recorded and returns, so that Hydra's launchers go on
    try:
        return run_or_skip(experiment, run_dir, rerun)
    except (KeyboardInterrupt, Terminated) as error:
        log.error("sweep %s at %s: the same command again finishes the missing runs",
                  error if isinstance(error, Terminated) else "interrupted", run_dir.name)
        if isinstance(error, Terminated):
            raise
        sys.exit(130)


def run_or_skip(experiment, run_dir, rerun):
    if not rerun and read_run_status(run_dir) == "ok":
        log.info("skipped %s: already ok (sweep.rerun=true runs it again)", run_dir.name)
        return None
    release_resources()
    try:
        return experiment()
    except Exception as raised:
        # a run folder locked by another run keeps that run's metrics.json: the message comes from the error
        error = find_user_error(raised) or (read_json(run_dir / "metrics.json") or {}).get("error")
        log.error("failed %s: %s (traceback in metrics.json)", run_dir.name, error,
                  exc_info=os.environ.get("HYDRA_FULL_ERROR") == "1")
        return None
    finally:
        release_resources()
