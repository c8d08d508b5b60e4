# tests/test_output_errors.py
import errno

import pytest
import torch

from defectvad.atomic_files import write_text_atomic
from defectvad.engine import checkpoints
from defectvad.errors import OutputError, describe_output_error


def test_a_full_disk_names_the_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "weights" / "last.safetensors"
    checkpoints.save_weights(torch.nn.Linear(2, 2), target)
    before = target.read_bytes()

    def write_half_then_fill_the_disk(out, tensors):
        out.write(before[: len(before) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "write_safetensors", write_half_then_fill_the_disk)
    with pytest.raises(OutputError) as caught:
        checkpoints.save_weights(torch.nn.Linear(2, 2), target)
    assert str(caught.value) == (f"cannot write {target}: no space left on the device; free some space or choose a "
                                 f"folder on another disk (paths.output_dir, paths.multirun_dir or hydra.run.dir)")
    assert target.read_bytes() == before
    assert sorted(path.name for path in target.parent.iterdir()) == ["last.safetensors"]


def test_a_folder_under_a_file_names_the_file(tmp_path):
    blocking = tmp_path / "results.txt"
    blocking.write_text("not a folder")
    target = blocking / "run" / "metrics.json"
    with pytest.raises(OutputError) as caught:
        write_text_atomic(target, "{}")
    assert str(caught.value) == (f"cannot write {target}: {blocking} is a file, not a folder; choose another "
                                 f"folder (paths.output_dir, paths.multirun_dir or hydra.run.dir)")
    assert blocking.read_text() == "not a folder"


def test_permission_and_read_only_messages_and_other_errors_left_alone(tmp_path):
    denied = describe_output_error(PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x")))
    assert denied == (f"cannot write {tmp_path / 'x'}: permission denied; choose a folder you may write to "
                      f"(paths.output_dir, paths.multirun_dir or hydra.run.dir)")
    read_only = describe_output_error(OSError(errno.EROFS, "Read-only file system"), tmp_path / "y")
    assert read_only.startswith(f"cannot write {tmp_path / 'y'}: the file system is read-only")
    assert describe_output_error(OSError(errno.EIO, "I/O error"), tmp_path) is None
    assert describe_output_error(ValueError("no")) is None
