"""The sd_notify protocol (READY, STATUS, WATCHDOG, RELOADING, STOPPING) over
$NOTIFY_SOCKET, abstract sockets included. Does nothing when not under systemd.

The watchdog ping runs as a task on the daemon's own event loop, so a wedged
loop stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from edged.daemon import Daemon

log = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify datagrams; every method is a no-op without NOTIFY_SOCKET."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address.startswith("@"):
            self.address = "\0" + address[1:]
        elif address.startswith("/"):
            self.address = address
        self.watchdog_seconds: float | None = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_seconds = int(usec) / 1e6
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *lines: str) -> bool:
        """Send one datagram of KEY=VALUE lines; False when it could not be sent."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode(), self.address)
            return True
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False

    def status(self, message: str) -> None:
        self.send(f"STATUS={message.replace(chr(10), ' ')}")

    def ready(self) -> None:
        self.send("READY=1", f"MAINPID={os.getpid()}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    async def watchdog_loop(self) -> None:
        """Ping at half the watchdog interval, from the event loop itself."""
        if self.watchdog_seconds is None:
            return
        interval = self.watchdog_seconds / 2
        while True:
            self.send("WATCHDOG=1")
            await asyncio.sleep(interval)


def attach(daemon: "Daemon") -> None:
    """Wire a Notifier into the daemon's lifecycle when NOTIFY_SOCKET is set."""
    notifier = Notifier()
    if not notifier.enabled:
        return
    daemon.status_listeners.append(notifier.status)
    daemon.ready_listeners.append(notifier.ready)
    daemon.reloading_listeners.append(notifier.reloading)
    daemon.stopping_listeners.append(notifier.stopping)
    daemon.loop_tasks.append(notifier.watchdog_loop)
