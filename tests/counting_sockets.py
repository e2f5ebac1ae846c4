"""A Connection over a socket that counts its recv calls: the system calls a test of
:class:`egressd.net.connection.Connection`'s waits counts (tests/net)."""

from __future__ import annotations

import socket

from egressd.net.connection import Connection


class CountingSocket(socket.socket):
    """A socket that counts its recv calls (system calls a Connection makes)."""

    recvs = 0

    def recv(self, size: int, flags: int = 0) -> bytes:
        self.recvs += 1
        return super().recv(size, flags)


def counting_pair() -> tuple[Connection, CountingSocket, socket.socket]:
    """A Connection over a counting Unix socket, its socket, and the peer's end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    counting = CountingSocket(ours.family, ours.type, 0, ours.detach())
    return Connection(counting), counting, theirs
