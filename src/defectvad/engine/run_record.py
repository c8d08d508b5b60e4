# src/defectvad/engine/run_record.py
import traceback
from contextlib import contextmanager
from datetime import datetime, timezone

from defectvad.atomic_files import write_json_atomic
from defectvad.errors import find_user_error


def now():
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextmanager
def keep_run_record(path, record):
    # metrics.json from a run's start to its end: "running" at once (a run killed outright leaves that, never a
    # stale "ok"), then "ok", "failed" or "interrupted" with the error and traceback, and the finished time;
    # every write replaces the file atomically
    record["status"] = "running"
    record["run"]["started"] = now()
    write_json_atomic(path, record)
    try:
        yield record
        record["status"] = "ok"
    except BaseException as error:
        record["status"] = "interrupted" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "failed"
        record["error"] = str(find_user_error(error) or error) or type(error).__name__
        record["traceback"] = traceback.format_exc()
        raise
    finally:
        record["run"]["finished"] = now()
        write_json_atomic(path, record)
