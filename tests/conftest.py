# tests/conftest.py
import os
import socket
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def block_network(monkeypatch):
    # any accidental download fails the test instead of hanging
    def refuse(*args, **kwargs):
        raise RuntimeError("network access is blocked in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session", autouse=True)
def block_network_in_subprocesses():
    # every Python process a test starts imports network_block/sitecustomize.py first (session scope: before the
    # module fixtures that start src/run.py); -I, -E or -S in a child would skip it
    folder = str(Path(__file__).resolve().parent / "network_block")
    path = os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", path)
        yield


@pytest.fixture(scope="module")
def single_thread():
    # the test machine is shared: one thread avoids OpenMP spinning against other processes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
