# tests/test_atomic_files.py
import json

import pytest

from defectvad.atomic_files import atomic_write, write_folder_atomic, write_json_atomic, write_text_atomic


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_json_atomic(target, {"status": "ok", "value": float("nan")})
    assert json.loads(target.read_text())["status"] == "ok"
    with atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.suffix == ".json" and tmp != target
        tmp.write_text("{}")
        assert json.loads(target.read_text())["status"] == "ok"  # the old file until the rename
    assert target.read_text() == "{}"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = write_text_atomic(tmp_path / "table.csv", "old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def write_two_files(folder):
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    (folder / "b.txt").write_text("b")


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "tiles"
    write_folder_atomic(target, write_two_files)
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiles"]

    def fail(folder):
        folder.mkdir()
        (folder / "a.txt").write_text("a")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomic(tmp_path / "weave", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["tiles"]
    # another process finished the same folder first: its folder stays, the late writer's is removed
    write_folder_atomic(target, lambda folder: write_two_files(folder) or (folder / "c.txt").write_text("c"))
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["tiles"]
