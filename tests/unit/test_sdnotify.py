import os
import socket

import pytest

from edged.sdnotify import Notifier


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    else:
        name = f"edged-test-{os.getpid()}-{id(sock)}"
        sock.bind("\0" + name)
        address = "@" + name
    sock.settimeout(2)
    yield address, sock
    sock.close()


def test_messages_reach_the_socket(listener):
    address, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": address})
    notifier.status("loading models")
    assert sock.recv(4096) == b"STATUS=loading models"
    notifier.ready()
    assert sock.recv(4096).split(b"\n")[0] == b"READY=1"
    notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_noop_without_socket():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False


def test_watchdog_interval_respects_pid():
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000"}).watchdog_seconds == 2.0
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}).watchdog_seconds is None
    assert Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_seconds == 2.0
