"""The accept loop: out of descriptors it pauses and retries; it never dies of it.

The listener is a real loopback socket whose ``_accept`` fails with EMFILE a few times
before it works, as it would while the process is at RLIMIT_NOFILE (without using up the
machine's descriptors). Time is trio's fake clock.
"""

from __future__ import annotations

import errno
import logging
import socket

import pytest
import trio
import trio.testing

from egressd.net import listen
from egressd.net.connection import Connection


class OutOfDescriptors(socket.socket):
    """A listening socket whose first ``failures`` accepts fail with EMFILE."""

    def __init__(self, failures: int) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.bind(("127.0.0.1", 0))
        self.listen(16)
        self.setblocking(False)
        self.failures = failures
        self.tries: list[tuple[float, str]] = []

    def _accept(self) -> tuple[int, object]:  # what accept() and the accept loop call
        if self.failures:
            self.failures -= 1
            self.tries.append((trio.current_time(), "EMFILE"))
            raise OSError(errno.EMFILE, "Too many open files")
        try:
            accepted: tuple[int, object] = super()._accept()  # type: ignore[misc]
        except BlockingIOError:
            self.tries.append((trio.current_time(), "nothing waiting"))
            raise
        self.tries.append((trio.current_time(), "accepted"))
        return accepted


async def test_emfile_pauses_the_accept_loop_which_then_serves_the_waiting_client(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="egressd")
    listener = OutOfDescriptors(failures=3)
    port = listener.getsockname()[1]
    served: list[tuple[str, int] | None] = []
    arrived = trio.Event()

    async def handler(connection: Connection) -> None:
        served.append(connection.peer)
        arrived.set()

    client = await trio.open_tcp_stream("127.0.0.1", port)  # waits in the backlog
    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen.accept_loop, listener, handler, nursery)
        with trio.fail_after(5):
            await arrived.wait()
        first_try = listener.tries[0][0]
        outcomes = [outcome for _, outcome in listener.tries]
        assert outcomes[:4] == ["EMFILE", "EMFILE", "EMFILE", "accepted"]
        gaps = [b[0] - a[0] for a, b in zip(listener.tries[:3], listener.tries[1:4], strict=True)]
        assert all(gap >= listen._CAPACITY_PAUSE for gap in gaps), gaps
        assert listener.tries[3][0] - first_try < 1.0  # paused, not given up for long

        # Still accepting once descriptors are back.
        arrived = trio.Event()
        second = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(5):
            await arrived.wait()
        nursery.cancel_scope.cancel()
    await client.aclose()
    await second.aclose()
    assert len(served) == 2
    paused = [r for r in caplog.records if r.getMessage().startswith("accept paused")]
    assert len(paused) == 3
    assert listener.fileno() == -1  # the loop closes its listener when it ends
