"""The listening socket of ``serve``: handed over by systemd (socket activation), or bound here.

systemd's protocol (``sd_listen_fds(3)``): the sockets start at fd 3, ``LISTEN_FDS`` says how many, and
``LISTEN_PID`` names the process they are meant for (a child that inherits the environment must not take
them for its own). ``serve`` takes the first, and unsets both variables so that nothing it starts reads
them again. A socket that systemd holds outlives ``serve``: while ``serve`` is stopped, connections wait
in its queue instead of being refused, and the next ``serve`` answers them.

:func:`notify` is ``sd_notify(3)``: under ``Type=notify`` it tells systemd when ``serve`` is ready, when
it reloads and when it stops (nothing without ``NOTIFY_SOCKET``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

LISTEN_FDS_START = 3
BACKLOG = 2048
"""Connections the kernel queues while no receiver process accepts (uvicorn's own default)."""


class SocketError(OSError):
    """The handed-over socket is not usable, or the address cannot be bound; the message says which."""


def inherited() -> socket.socket | None:
    """The first socket systemd handed to this process, or None when there is none for it."""
    count, pid = os.environ.get("LISTEN_FDS"), os.environ.get("LISTEN_PID")
    if count is None:
        return None
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if pid is not None and pid != str(os.getpid()):
        return None
    if not count.isdigit() or int(count) < 1:
        raise SocketError(f"LISTEN_FDS={count!r}: expected the number of sockets handed over (1 or more)")
    try:
        sock = socket.socket(fileno=LISTEN_FDS_START)
    except OSError as exc:
        raise SocketError(f"LISTEN_FDS: fd {LISTEN_FDS_START} is not a socket ({exc.strerror})") from None
    if sock.type != socket.SOCK_STREAM or sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 1:
        sock.detach()
        raise SocketError(f"LISTEN_FDS: fd {LISTEN_FDS_START} is not a listening stream socket")
    sock.set_inheritable(False)  # passed on to receiver processes by name, not by accident
    return sock


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when the host is an IPv6 address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise SocketError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def address(sock: socket.socket) -> tuple[str, int | str]:
    """(host, port) the socket listens on; (path, "unix") for a Unix socket."""
    name = sock.getsockname()
    if isinstance(name, str):
        return name, "unix"
    return str(name[0]), int(name[1])


def notify(state: str) -> None:
    """Send ``state`` (``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``STATUS=…``) to systemd, if it asks."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if state.startswith("RELOADING=1"):  # Type=notify-reload wants the time the reload started
        state += f"\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    path = "\0" + target[1:] if target.startswith("@") else target
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), path)
