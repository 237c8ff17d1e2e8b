"""systemd integration without libsystemd: the sd_notify datagram protocol.

When systemd starts the agent with `Type=notify` it sets NOTIFY_SOCKET (a path, or an abstract
socket when it starts with '@') and, with `WatchdogSec=`, WATCHDOG_USEC. The agent sends
`READY=1` once it can sign, `STATUS=...` lines as its health changes, `WATCHDOG=1` from a trio task
(so a wedged event loop stops the pings and systemd restarts it), and `STOPPING=1` on shutdown.
Outside systemd every call is a no-op. `listen_sockets` takes the listening sockets systemd
passes with socket activation (keyquorum.socket), so the socket exists before the agent starts
and survives its restarts.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping, MutableMapping


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


SD_LISTEN_FDS_START = 3


def listen_sockets(env: MutableMapping[str, str] | None = None) -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation (sd_listen_fds), by FileDescriptorName.

    Only when LISTEN_PID is this process (the variables are inherited by children otherwise).
    The variables are removed afterwards, as sd_listen_fds(unset_environment=1) does, so nothing
    this process starts mistakes the descriptors for its own. Unnamed descriptors are called
    "api" (the first) and "fd<N>".
    """
    environ = os.environ if env is None else env
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        count = 0
    names = [n for n in environ.get("LISTEN_FDNAMES", "").split(":") if n]
    for variable in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(variable, None)
    sockets: dict[str, socket.socket] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        named = i < len(names) and names[i] != "unknown"
        name = names[i] if named else ("api" if i == 0 else f"fd{fd}")
        sock = socket.socket(fileno=fd)
        os.set_inheritable(fd, False)
        sockets[name] = sock
    return sockets
