"""The service's listening sockets: bound early, so a taken port fails before the model loads,
and listening only once the worker is ready (uvicorn calls listen() when it starts serving)."""

from __future__ import annotations

import socket


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def bind_listener(host: str, port: int, *, shared: bool = False) -> socket.socket:
    """A socket bound to the service's address, not yet listening. `shared`: one of several workers'
    sockets on the same port (SO_REUSEPORT: the kernel spreads new connections evenly over them). With
    one socket shared by all workers, whichever happened to be idle when a client connected took its
    connection, and keep-alive clients stayed where they landed: measured with 64 clients, runs
    alternated between both workers busy and one doing it all (half the throughput). Each worker alone
    holds its socket, so when it stops listening (it died, or it drains) new connections go to the
    others instead of waiting for it."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def address(host: str, port: int) -> str:
    """host:port as a person reads it (an IPv6 host in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str, port: int) -> int:
    """The port, checked free as a single-process server would find it: one that another service listens
    on (even a second copy of this one, whose sockets would let ours join) is refused. Port 0: a free one."""
    with bind_listener(host, port) as probe:
        return probe.getsockname()[1]
