# tests/conftest.py
import socket

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


@pytest.fixture(scope="module")
def single_thread():
    # the test machine is shared: one thread avoids OpenMP spinning against other processes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
