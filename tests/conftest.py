# tests/conftest.py
import socket

import pytest


@pytest.fixture(autouse=True)
def block_network(monkeypatch):
    # any accidental download fails the test instead of hanging
    def refuse(*args, **kwargs):
        raise RuntimeError("network access is blocked in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
