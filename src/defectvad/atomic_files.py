# src/defectvad/atomic_files.py
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_write(path):
    # yields a temporary path in the target's folder; the finished file replaces the target in one rename,
    # so a reader sees the old file or the whole new one, and an error leaves the target untouched.
    # The temporary name keeps the target's ending, which writers that pick the format by name need
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path, text):
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path, payload):
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str, allow_nan=True))
