# src/defectvad/atomic_files.py
import json
import os
import shutil
import uuid
from contextlib import contextmanager, suppress
from pathlib import Path

from defectvad.errors import OutputError, describe_output_error


@contextmanager
def atomic_write(path):
    # yields a temporary path in the target's folder; the finished file replaces the target in one rename,
    # so a reader sees the old file or the whole new one, and an error leaves the target untouched.
    # The temporary name keeps the target's ending, which writers that pick the format by name need.
    # A disk that refuses the write (permission, read-only, full) gives an OutputError naming the path
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        message = describe_output_error(error, path)
        if message is None:
            raise
        raise OutputError(message) from error
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_folder_atomic(target, write):
    # write(folder) fills a temporary folder beside target, which then becomes target in one rename; when another
    # process finished the same target first, its folder is kept
    target = Path(target)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        write(temporary)
        os.rename(temporary, target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def write_text_atomic(path, text):
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path, payload):
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str, allow_nan=True))


def read_json(path):
    # a JSON file written by write_json_atomic, or None when it is missing or unreadable
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
