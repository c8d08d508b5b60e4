# tests/test_run_folders.py
import json
import os
import socket
import subprocess
import sys

import pytest

from defectvad.engine.run_folders import clear_run_folder, lock_run_folder
from defectvad.errors import ConfigError, RunFolderError


def write_run(folder, status):
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "last.safetensors").write_bytes(b"old weights")
    (folder / "test_scores.csv").write_text("old scores")
    (folder / "metrics.json").write_text(json.dumps({"status": status, "run": {"finished": "2026-01-02T03:04:05"}}))


def test_a_second_lock_names_the_holder_and_the_lock_goes_with_its_run(tmp_path):
    with lock_run_folder(tmp_path) as path:
        holder = json.loads(path.read_text())
        assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(RunFolderError) as caught:
            with lock_run_folder(tmp_path):
                pass
        assert str(caught.value) == (
            f"the run folder {tmp_path} is in use by process {os.getpid()} on {socket.gethostname()} (started "
            f"{holder['started']}; lock file {path}); wait for it to end or choose another hydra.run.dir")
        assert json.loads(path.read_text()) == holder
    assert not path.exists()


def test_a_lock_of_a_dead_process_is_taken_over(tmp_path):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"pid": int(ended.stdout), "host": socket.gethostname(), "started": "2026-01-01T00:00:00+00:00"}
    (tmp_path / "run.lock").write_text(json.dumps(stale))
    with lock_run_folder(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    # another host's lock cannot be judged from here: it holds
    (tmp_path / "run.lock").write_text(json.dumps({**stale, "host": "another-host"}))
    with pytest.raises(RunFolderError, match=f"in use by process {stale['pid']} on another-host"):
        with lock_run_folder(tmp_path):
            pass


def test_an_ok_run_is_kept_unless_overwrite_and_then_moved_aside_whole(tmp_path):
    write_run(tmp_path, "ok")
    with pytest.raises(RunFolderError) as caught:
        clear_run_folder(tmp_path, False)
    assert str(caught.value) == (
        f"the run folder {tmp_path} already holds an ok run (finished 2026-01-02T03:04:05); overwrite=true runs "
        f"again and moves its outputs to {tmp_path}/previous-<time>/, or choose another hydra.run.dir")
    with pytest.raises(ConfigError, match="overwrite=yes is not allowed: overwrite must be true or false"):
        clear_run_folder(tmp_path, "yes")
    assert (tmp_path / "test_scores.csv").read_text() == "old scores"
    previous = clear_run_folder(tmp_path, True)
    assert previous.parent == tmp_path and previous.name.startswith("previous-")
    assert sorted(path.name for path in tmp_path.iterdir()) == [previous.name]
    assert (previous / "test_scores.csv").read_text() == "old scores"
    assert (previous / "weights" / "last.safetensors").read_bytes() == b"old weights"


def test_a_failed_run_moves_aside_without_overwrite_and_a_new_folder_is_left_alone(tmp_path):
    write_run(tmp_path / "failed", "failed")
    previous = clear_run_folder(tmp_path / "failed", False)
    assert json.loads((previous / "metrics.json").read_text())["status"] == "failed"
    assert [path.name for path in (tmp_path / "failed").iterdir()] == [previous.name]
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "run.log").write_text("")
    assert clear_run_folder(tmp_path / "new", False) is None
    assert [path.name for path in (tmp_path / "new").iterdir()] == ["run.log"]
