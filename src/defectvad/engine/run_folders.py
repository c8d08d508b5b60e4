# src/defectvad/engine/run_folders.py
# one run at a time in a folder, and a finished run's outputs never mixed with a new run's
import errno
import json
import logging
import os
import socket
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from defectvad.atomic_files import read_json
from defectvad.engine.run_record import now
from defectvad.errors import ConfigError, OutputError, RunFolderError, describe_output_error

log = logging.getLogger("defectvad")

LOCK_NAME = "run.lock"
PREVIOUS_PREFIX = "previous-"


@contextmanager
def lock_run_folder(run_dir):
    # run.lock holds the process id and host of the run that writes the folder; created with O_EXCL, so of two
    # runs started at once one gets it and the other stops; a lock left by a dead process on this host is taken over
    path = Path(run_dir) / LOCK_NAME
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": now()}
    for _ in range(3):
        if create_lock(path, holder):
            break
        found = read_json(path)
        if not is_stale(found):
            close_log_files(run_dir)
            raise RunFolderError(describe_holder(run_dir, path, found))
        log.warning("taking over %s: process %s on %s has ended", path, found.get("pid"), found.get("host"))
        path.unlink(missing_ok=True)
    else:
        close_log_files(run_dir)
        raise RunFolderError(describe_holder(run_dir, path, read_json(path)))
    try:
        yield path
    finally:
        if read_json(path) == holder:
            path.unlink(missing_ok=True)


def create_lock(path, holder):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    except OSError as error:
        raise OutputError(describe_output_error(error, path) or f"cannot create {path}: {error}") from error
    with os.fdopen(handle, "w") as stream:
        stream.write(json.dumps(holder))
    return True


def is_stale(holder):
    # only a lock of this host can be judged: its process is gone when signal 0 finds no such process
    if not isinstance(holder, dict) or holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, KeyError, TypeError, ValueError) as error:
        return getattr(error, "errno", None) == errno.ESRCH
    return False


def describe_holder(run_dir, path, holder):
    if not isinstance(holder, dict):
        # a lock being written this instant, or not ours: say what is there
        return (f"the run folder {run_dir} is in use: {path} exists; if no run writes there, delete it, or choose "
                f"another hydra.run.dir")
    return (f"the run folder {run_dir} is in use by process {holder.get('pid')} on {holder.get('host')} "
            f"(started {holder.get('started')}; lock file {path}); wait for it to end or choose another "
            f"hydra.run.dir")


def clear_run_folder(run_dir, overwrite):
    # a single run: a folder holding an ok run stops it unless overwrite=true; the outputs of any earlier run
    # (a metrics.json says there was one) move to previous-<time>/, so new and old files never mix
    if not isinstance(overwrite, bool):
        raise ConfigError(f"overwrite={overwrite} is not allowed: overwrite must be true or false")
    run_dir = Path(run_dir)
    record = read_json(run_dir / "metrics.json")
    if record is None and not (run_dir / "metrics.json").exists():
        return None
    status = record.get("status") if isinstance(record, dict) else None
    if status == "ok" and not overwrite:
        close_log_files(run_dir)
        finished = (record.get("run") or {}).get("finished")
        raise RunFolderError(f"the run folder {run_dir} already holds an ok run (finished {finished}); overwrite=true "
                             f"runs again and moves its outputs to {run_dir}/{PREVIOUS_PREFIX}<time>/, or choose "
                             f"another hydra.run.dir")
    return move_outputs_aside(run_dir)


def move_outputs_aside(run_dir):
    target = run_dir / f"{PREVIOUS_PREFIX}{datetime.now():%Y-%m-%d_%H-%M-%S_%f}"
    entries = [entry for entry in run_dir.iterdir()
               if entry.name != LOCK_NAME and not entry.name.startswith(PREVIOUS_PREFIX)]
    try:
        target.mkdir()
        for entry in entries:
            entry.rename(target / entry.name)
    except OSError as error:
        raise OutputError(describe_output_error(error, target) or f"cannot move {run_dir}'s outputs to {target}: "
                          f"{error}") from error
    reopen_log_files(run_dir)
    log.info("the earlier run's outputs were moved to %s", target)
    return target


def find_log_files(run_dir):
    # the handlers of Hydra's job logging that write into the run folder (run.log)
    folder = Path(run_dir).resolve()
    return [handler for handler in logging.getLogger().handlers
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == folder]


def reopen_log_files(run_dir):
    # Hydra opened run.log before the run began; its handler follows the old file to previous-<time>/ otherwise
    for handler in find_log_files(run_dir):
        stream = handler.setStream(open(handler.baseFilename, "a", encoding=handler.encoding))
        if stream is not None:
            stream.close()


def close_log_files(run_dir):
    # the folder belongs to another run: this process writes nothing more into its run.log
    for handler in find_log_files(run_dir):
        logging.getLogger().removeHandler(handler)
        handler.close()
