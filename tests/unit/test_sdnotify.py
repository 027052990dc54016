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
    """Pings keep coming while the loop runs; none is sent while the loop is blocked.
    Decided by what arrived, not by how many fit in a time window: a datagram is in
    the socket once sendto returns, so draining before and after a block that never
    yields to the loop sees exactly the pings sent in between (none)."""
    import asyncio
    import time

    address, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "100000"})  # ping every 50 ms
    sock.setblocking(False)

    def drain() -> list[bytes]:
        got = []
        while True:
            try:
                got.append(sock.recv(4096))
            except BlockingIOError:
                return got

    async def scenario() -> tuple[list[bytes], list[bytes]]:
        task = asyncio.ensure_future(notifier.watchdog_loop())
        pings: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(pings) < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            pings += drain()
        time.sleep(0.3)  # a wedged loop: six intervals without a chance to ping
        during_block = drain()
        task.cancel()
        return pings, during_block

    pings, during_block = asyncio.run(scenario())
    assert len(pings) >= 4 and set(pings) == {b"WATCHDOG=1"}, pings
    assert during_block == []
