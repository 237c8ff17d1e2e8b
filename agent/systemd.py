"""systemd integration without libsystemd: the sd_notify datagram protocol.

When systemd starts the agent with `Type=notify` it sets NOTIFY_SOCKET (a path, or an abstract
socket when it starts with '@') and, with `WatchdogSec=`, WATCHDOG_USEC. The agent sends
`READY=1` once it can sign, `STATUS=...` lines as its health changes, `WATCHDOG=1` from a trio task
(so a wedged event loop stops the pings and systemd restarts it), and `STOPPING=1` on shutdown.
Outside systemd every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        self.address: str | None = None
        if address:
            self.address = "\0" + address[1:] if address.startswith("@") else address
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_for_us = not pid or pid == str(os.getpid())
        self.watchdog_interval: float | None = (
            int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and watchdog_for_us else None
        )
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        if self.address is None:
            return
        message = "\n".join(fields).encode()
        # If systemd went away (or a test closed its socket) there is nobody to tell.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
            sock.sendto(message, self.address)

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self, status: str = "draining in-flight requests") -> None:
        self.send("STOPPING=1", f"STATUS={status}")
