"""The channel between the supervisor and one worker: JSON messages, and file descriptors.

Theory of operation
-------------------
One ``AF_UNIX`` stream socket pair per worker (:func:`socket_pair`): the supervisor keeps one
end, the worker inherits the other (``pass_fds``). A message is a JSON object, framed as a
4-byte big-endian length and the UTF-8 text; at most :data:`MAX_MESSAGE` bytes (a metrics
snapshot of a large configuration is the biggest). A stream rather than ``SOCK_SEQPACKET``
because a datagram may not exceed the socket's send buffer (about 200 KiB by default).

File descriptors (the listening sockets) travel as ``SCM_RIGHTS`` ancillary data attached
to the first byte of the message that names them: that message says ``"fds": N`` and the
receiver takes the next N descriptors from the queue of those that arrived, in order.
The kernel delivers ancillary data no later than the byte it is attached to, so the
descriptors are always there when the message is complete.

Sending is serialized by a lock (a message is written whole before the next starts);
:meth:`Channel.receive` is for one task. End of file (the other process died or closed
its end) is :class:`ChannelClosed`.
"""

from __future__ import annotations

import array
import contextlib
import json
import socket
import struct
from collections import deque
from typing import Any

import trio

MAX_MESSAGE = 64 * 1024 * 1024
MAX_FDS_AT_ONCE = 253
"""SCM_MAX_FD: the kernel's cap on descriptors in one message."""
_HEADER = struct.Struct(">I")

Message = dict[str, Any]


class ChannelClosed(Exception):
    """The other end is gone (EOF, a reset, or a malformed message)."""


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected ``AF_UNIX`` stream sockets: the supervisor's and the worker's."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)


class Channel:
    """Messages (and descriptors) over one connected ``AF_UNIX`` stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = trio.socket.from_stdlib_socket(sock)
        self._send_lock = trio.Lock()
        self._buffer = bytearray()
        self._fds: deque[int] = deque()

    async def send(self, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Write ``message`` whole; ``fds`` go with it (``message["fds"]`` is set)."""
        if len(fds) > MAX_FDS_AT_ONCE:
            raise ValueError(f"at most {MAX_FDS_AT_ONCE} descriptors in one message")
        body = json.dumps({**message, "fds": len(fds)}, separators=(",", ":")).encode()
        data = _HEADER.pack(len(body)) + body
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            async with self._send_lock:
                sent = await self.sock.sendmsg([data], ancillary)
                while sent < len(data):
                    sent += await self.sock.send(data[sent:])
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc

    async def receive(self) -> tuple[Message, list[socket.socket]]:
        """The next message and the sockets it carried (the caller owns them)."""
        while True:
            message = self._next_message()
            if message is not None:
                count = message.get("fds", 0)
                if not isinstance(count, int) or count > len(self._fds):
                    raise ChannelClosed("a message named descriptors that did not arrive")
                return message, [_adopt(self._fds.popleft()) for _ in range(count)]
            await self._receive_some()

    def close(self) -> None:
        self.sock.close()
        while self._fds:
            _close_fd(self._fds.popleft())

    def _next_message(self) -> Message | None:
        if len(self._buffer) < _HEADER.size:
            return None
        (length,) = _HEADER.unpack_from(self._buffer)
        if length > MAX_MESSAGE:
            raise ChannelClosed(f"a message of {length} bytes is over the limit")
        if len(self._buffer) < _HEADER.size + length:
            return None
        body = bytes(self._buffer[_HEADER.size : _HEADER.size + length])
        del self._buffer[: _HEADER.size + length]
        try:
            message = json.loads(body)
        except ValueError as exc:
            raise ChannelClosed(f"a message that is not JSON: {exc}") from exc
        if not isinstance(message, dict):
            raise ChannelClosed("a message that is not a JSON object")
        return message

    async def _receive_some(self) -> None:
        space = socket.CMSG_SPACE(MAX_FDS_AT_ONCE * array.array("i").itemsize)
        try:
            data, ancillary, _, _ = await self.sock.recvmsg(
                256 * 1024, space, socket.MSG_CMSG_CLOEXEC
            )
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if not data:
            raise ChannelClosed("end of file")
        self._buffer += data


def _adopt(fd: int) -> socket.socket:
    """A received descriptor as a non-blocking, close-on-exec socket object."""
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    sock.set_inheritable(False)
    return sock


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        socket.close(fd)
