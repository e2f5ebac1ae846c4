"""Connection: the system call first, the scheduler only to wait, yet fair and cancellable."""

from __future__ import annotations

import socket

import pytest
import trio

from egressd.net.connection import Connection


def connected_pair() -> tuple[Connection, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(ours), theirs


async def test_a_peer_that_always_has_data_ready_cannot_starve_other_tasks() -> None:
    connection, peer = connected_pair()
    peer.sendall(b"x" * 4096)  # every receive below finds data at once
    turns = 0

    async def other_task() -> None:
        nonlocal turns
        while True:
            turns += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()
        started = turns
        for _ in range(64):
            assert await connection.receive_some(1) == b"x"
        assert turns - started >= 64 // 16 - 1  # it yielded at least every 16 calls
        nursery.cancel_scope.cancel()
    connection.close()
    peer.close()


async def test_a_cancelled_task_is_stopped_at_its_next_call_even_with_data_ready() -> None:
    connection, peer = connected_pair()
    peer.sendall(b"ready")
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await connection.receive_some(10)
        with pytest.raises(trio.Cancelled):
            await connection.send_all(b"no")
    assert await connection.receive_some(10) == b"ready"  # nothing was consumed
    connection.close()
    peer.close()


async def test_errors_are_trio_stream_errors() -> None:
    connection, peer = connected_pair()
    peer.close()
    with pytest.raises(trio.BrokenResourceError) as broken:
        for _ in range(100):  # the first sends may still fit in the buffer
            await connection.send_all(b"x" * 65536)
    assert isinstance(broken.value.__cause__, OSError)
    await connection.send_eof()
    with pytest.raises(trio.ClosedResourceError):
        await connection.send_all(b"after EOF")
    connection.close()
    with pytest.raises(trio.ClosedResourceError):
        await connection.receive_some(1)
