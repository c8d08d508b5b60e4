# tests/test_network_block.py
import os
import socket
import subprocess
import sys

CONNECT = "import socket, sys\nsocket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)"
RAW_CONNECT = "import socket, sys\nsocket.socket().connect(('127.0.0.1', int(sys.argv[1])))"
LOCAL_PIPE = """import sys
from multiprocessing.connection import Client, Listener
with Listener(sys.argv[1], family="AF_UNIX") as listener:
    client = Client(sys.argv[1], family="AF_UNIX")
    with listener.accept() as server:
        client.send("local ok")
        print(server.recv())
"""


def closed_port():
    # bind (allowed) to get a free port, then close it: nothing listens there
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_child(code, argument, env=None):
    return subprocess.run([sys.executable, "-c", code, str(argument)], capture_output=True, text=True, timeout=60,
                          env=env)


def test_a_child_process_cannot_connect():
    port = closed_port()
    for code in (CONNECT, RAW_CONNECT):
        result = run_child(code, port)
        assert result.returncode == 1
        assert "RuntimeError: network access is blocked in tests" in result.stderr
        assert "ConnectionRefusedError" not in result.stderr


def test_without_the_block_the_same_port_refuses():
    # the control: the port really is closed, so the message above comes from the block and not the port
    env = dict(os.environ)
    folders = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not p.endswith("network_block")]
    env["PYTHONPATH"] = os.pathsep.join(folders)
    result = run_child(CONNECT, closed_port(), env)
    assert result.returncode == 1
    assert "ConnectionRefusedError" in result.stderr


def test_a_child_keeps_local_pipes(tmp_path):
    # DataLoader workers share tensors over AF_UNIX sockets, which must keep working
    result = run_child(LOCAL_PIPE, tmp_path / "pipe")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "local ok"
