# tests/network_block/sitecustomize.py
# Python imports this at start-up in every process the tests start (tests/conftest.py puts this folder first on
# their PYTHONPATH): internet sockets refuse to connect as in the test process; local AF_UNIX sockets still work
import socket

MESSAGE = "network access is blocked in tests"


def refuse(*args, **kwargs):
    raise RuntimeError(MESSAGE)


def local_only(connect):
    def guarded(self, address, *args, **kwargs):
        if self.family != getattr(socket, "AF_UNIX", None):
            raise RuntimeError(MESSAGE)
        return connect(self, address, *args, **kwargs)

    return guarded


socket.socket.connect = local_only(socket.socket.connect)
socket.socket.connect_ex = local_only(socket.socket.connect_ex)
socket.create_connection = refuse
