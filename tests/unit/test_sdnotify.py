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


def test_reloading_carries_monotonic_usec(listener):
    address, sock = listener
    Notifier({"NOTIFY_SOCKET": address}).reloading()
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")


def test_watchdog_pings_from_the_event_loop_and_stop_when_it_is_blocked(listener):
    import asyncio
    import time

    address, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"})  # ping every 50 ms

    async def scenario() -> None:
        task = asyncio.ensure_future(notifier.watchdog_loop())
        await asyncio.sleep(0.3)
        time.sleep(0.3)  # a wedged loop: no pings while it blocks
        task.cancel()

    asyncio.run(scenario())
    sock.settimeout(0.1)
    pings = []
    try:
        while True:
            pings.append(sock.recv(4096))
    except OSError:
        pass
    assert set(pings) == {b"WATCHDOG=1"}
    assert 4 <= len(pings) <= 9, len(pings)  # ~6 in the 0.3 s the loop ran, none in the blocked 0.3 s
