"""A free TCP port on 127.0.0.1, for the tests that start several processes or a server: with
`make test` running the suite in several pytest workers (pytest-xdist), no two of them may fall
back on the same default port (accelerate's 29500)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
