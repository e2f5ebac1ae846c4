"""Connection: the system call first, the scheduler only to wait, yet fair and cancellable."""

from __future__ import annotations

import fcntl
import math
import os
import socket
import time

import pytest
import trio
import trio.testing
from counting_sockets import counting_pair

from egressd.net.connection import Connection, TimedStream, timed


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


async def test_after_a_short_read_the_next_read_waits_before_its_recv() -> None:
    """A short read emptied the kernel's queue: in a lock-step exchange every later read
    costs one recv, not a failed one and then another."""
    connection, counting, peer = counting_pair()
    peer.sendall(b"220 hello\r\n")
    assert await connection.receive_some(100) == b"220 hello\r\n"
    for reply in (b"250 one\r\n", b"250 two\r\n", b"221 bye\r\n"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.receive_some, 100)
            await trio.testing.wait_all_tasks_blocked()
            peer.sendall(reply)
    assert counting.recvs == 4
    peer.sendall(b"late")  # ready before the call: taken by the wait and one recv
    assert await connection.receive_some(100) == b"late"
    assert counting.recvs == 5
    connection.close()
    peer.close()


async def test_after_a_full_read_the_next_read_tries_at_once() -> None:
    """A read that filled its buffer may have left bytes behind (a message body): the next
    read takes them without waiting, and only a short read makes the one after it wait."""
    connection, counting, peer = counting_pair()
    peer.sendall(b"x" * 25)
    assert await connection.receive_some(10) == b"x" * 10
    assert await connection.receive_some(10) == b"x" * 10
    assert await connection.receive_some(10) == b"x" * 5
    assert counting.recvs == 3
    peer.close()
    assert await connection.receive_some(10) == b""  # EOF after the wait
    assert counting.recvs == 4
    connection.close()


async def test_a_read_after_a_short_read_takes_ready_bytes_once_its_limit_expired(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Waiting first is only a saving: bytes that are ready are still taken whatever the
    limit, even after a wait under it reached its end."""
    connection, peer = connected_pair()
    connection.time_limit(5)
    peer.sendall(b"a")
    assert await connection.receive_some(10) == b"a"
    with pytest.raises(trio.TooSlowError):
        await connection.receive_some(10)
    peer.sendall(b"b")
    assert await connection.receive_some(10) == b"b"
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


async def test_a_wait_that_reaches_the_time_limit_raises_too_slow_at_its_end(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection, peer = connected_pair()
    connection.time_limit(30)
    with pytest.raises(trio.TooSlowError):
        await connection.receive_some(10)
    assert trio.current_time() == 30
    connection.time_limit(5)
    with pytest.raises(trio.TooSlowError):
        while True:  # until the buffers are full and the write waits
            await connection.send_all(b"x" * 65536)
    assert trio.current_time() == 35
    connection.time_limit(math.inf)
    peer.recv(1 << 20)
    peer.sendall(b"later")
    assert await connection.receive_some(10) == b"later"  # the connection is still usable
    connection.close()
    peer.close()


async def test_the_limit_counts_every_wait_from_the_first_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection, peer = connected_pair()
    await trio.sleep(100)  # no wait yet: the limit starts with the first one
    connection.time_limit(10)

    async def answer_late() -> None:
        await trio.sleep(6)
        peer.sendall(b"first")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_late)
        assert await connection.receive_some(10) == b"first"  # waited 6 s of the 10
    with pytest.raises(trio.TooSlowError):
        await connection.receive_some(10)
    assert trio.current_time() == 110  # 4 s more, not 10
    connection.close()
    peer.close()


async def test_bytes_that_are_ready_are_taken_whatever_the_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection, peer = connected_pair()
    connection.time_limit(0)
    peer.sendall(b"ready")
    assert await connection.receive_some(10) == b"ready"  # no wait: no limit either
    await connection.send_all(b"fits")
    assert peer.recv(10) == b"fits"
    with pytest.raises(trio.TooSlowError):
        await connection.receive_some(10)
    assert trio.current_time() == 0
    connection.close()
    peer.close()


async def test_waits_on_many_connections_each_end_at_their_own_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One task keeps every deadline: a later deadline filed first, an earlier one filed
    after it, and a wait that ended in time must neither delay nor cut the others."""
    pairs = [connected_pair() for _ in range(3)]
    (slow, _), (fast, _), (answered, answered_peer) = pairs
    ended: dict[str, float] = {}

    async def wait_out(name: str, connection: Connection, limit: float) -> None:
        connection.time_limit(limit)
        with pytest.raises(trio.TooSlowError):
            await connection.receive_some(10)
        ended[name] = trio.current_time()

    async def answered_in_time() -> None:
        answered.time_limit(5)
        assert await answered.receive_some(10) == b"in time"
        answered.time_limit(math.inf)
        assert await answered.receive_some(10) == b"much later"  # no limit: never cut

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_out, "slow", slow, 50)
        nursery.start_soon(answered_in_time)
        await trio.sleep(1)
        nursery.start_soon(wait_out, "fast", fast, 10)  # earlier than the first one's
        await trio.sleep(2)
        answered_peer.sendall(b"in time")
        await trio.sleep(100)
        answered_peer.sendall(b"much later")
    assert ended == {"fast": 11, "slow": 50}
    for connection, peer in pairs:
        connection.close()
        peer.close()


async def test_a_read_and_a_write_waiting_on_one_connection_share_its_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection, peer = connected_pair()
    connection.time_limit(20)
    ended: list[tuple[str, float]] = []

    async def read() -> None:
        with pytest.raises(trio.TooSlowError):
            await connection.receive_some(10)
        ended.append(("read", trio.current_time()))

    async def write() -> None:
        with pytest.raises(trio.TooSlowError):
            while True:  # until the buffers are full and the write waits
                await connection.send_all(b"x" * 65536)
        ended.append(("write", trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(write)
    assert sorted(ended) == [("read", 20), ("write", 20)]
    connection.close()
    peer.close()


async def test_a_wait_without_a_limit_is_not_cut_by_another_waits_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The deadline task wakes every wait on the socket when one reaches its deadline; a
    wait filed under no limit (another task's, after the limit was lifted) waits on."""
    connection, peer = connected_pair()
    connection.time_limit(5)
    ended: dict[str, object] = {}

    async def write() -> None:
        with pytest.raises(trio.TooSlowError):
            while True:  # until the buffers are full and the write waits
                await connection.send_all(b"x" * 65536)
        ended["write"] = trio.current_time()

    async def read() -> None:
        await trio.sleep(1)
        connection.time_limit(math.inf)
        ended["read"] = await connection.receive_some(10), trio.current_time()

    async def answer_late() -> None:
        await trio.sleep(10)
        peer.sendall(b"late")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        nursery.start_soon(read)
        nursery.start_soon(answer_late)
    assert ended == {"write": 5, "read": (b"late", 10)}
    connection.close()
    peer.close()


async def test_a_wait_cancelled_by_its_caller_leaves_no_deadline_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection, peer = connected_pair()
    connection.time_limit(30)
    with trio.move_on_after(10):
        await connection.receive_some(10)
    assert trio.current_time() == 10
    connection.time_limit(math.inf)

    async def answer_late() -> None:
        await trio.sleep(60)  # long after the cancelled wait's deadline
        peer.sendall(b"late")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_late)
        assert await connection.receive_some(10) == b"late"
    assert trio.current_time() == 70
    connection.close()
    peer.close()


async def test_a_wait_that_ended_leaves_no_deadline_for_the_clock_to_jump_to(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection, peer = connected_pair()
    connection.time_limit(300)

    async def answer() -> None:
        await trio.sleep(1)
        peer.sendall(b"x")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer)
        assert await connection.receive_some(10) == b"x"
    connection.time_limit(math.inf)
    # The run now waits on a thread only: autojump moves the clock to the next deadline, and
    # the ended wait's 300 s must not be one.
    await trio.to_thread.run_sync(time.sleep, 0.05)
    assert trio.current_time() < 300
    connection.close()
    peer.close()


async def test_a_timed_stream_gives_any_stream_the_same_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    stream = timed(ours)
    assert isinstance(stream, TimedStream)
    stream.time_limit(30)
    with pytest.raises(trio.TooSlowError):
        await stream.receive_some(10)
    assert trio.current_time() == 30
    stream.time_limit(math.inf)
    await theirs.send_all(b"now")
    assert await stream.receive_some(10) == b"now"
    await stream.send_all(b"back")
    assert await theirs.receive_some(10) == b"back"
    connection, peer = connected_pair()
    assert timed(connection) is connection  # a Connection has its own
    connection.close()
    peer.close()


async def test_a_connection_closed_while_a_limited_wait_is_pending_is_closed_not_too_slow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The deadline task wakes waits the way a close does (notify_closing): a close by
    another task must still read as a close, at once, and not as a timeout."""
    connection, peer = connected_pair()
    connection.time_limit(30)

    async def close_later() -> None:
        await trio.sleep(5)
        connection.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(close_later)
        with pytest.raises(trio.ClosedResourceError):
            await connection.receive_some(10)
    assert trio.current_time() == 5
    peer.close()


async def test_a_long_read_under_one_limit_ends_at_its_deadline_with_bounded_bookkeeping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A body arriving in thousands of pieces under one limit files the same deadline at
    every wait: the deadline task keeps about one entry per wait in progress, not one per
    wait ever made, and still ends the limit on time."""
    connection, peer = connected_pair()
    other, other_peer = connected_pair()
    connection.time_limit(10)
    other.time_limit(10)  # the same deadline on another connection

    async def trickle() -> None:
        for _ in range(5000):
            await trio.sleep(0.001)
            peer.send(b"x")

    async def wait_out_other() -> None:
        with pytest.raises(trio.TooSlowError):
            await other.receive_some(10)
        assert trio.current_time() == 10

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_out_other)
        nursery.start_soon(trickle)
        received = 0
        while received < 5000:
            received += len(await connection.receive_some(10))
    deadlines = connection._deadlines
    assert deadlines is not None and len(deadlines.heap) < 2100
    with pytest.raises(trio.TooSlowError):
        await connection.receive_some(10)
    assert trio.current_time() == 10  # 5 s of waits, then the rest of the 10
    for conn, their in ((connection, peer), (other, other_peer)):
        conn.close()
        their.close()


async def test_closing_a_connection_another_task_waits_on_wakes_it_with_closed() -> None:
    connection, peer = connected_pair()
    woken: list[str] = []

    async def read() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await connection.receive_some(10)
        woken.append("read")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            connection.close()
    assert woken == ["read"]
    peer.close()


async def test_a_descriptor_closed_after_its_waits_ended_is_waited_on_afresh_when_reused() -> None:
    """No task waits when the connection closes, after waits that ended with their event:
    a socket given the same descriptor next is waited on and woken as usual."""
    connection, peer = connected_pair()
    peer.sendall(b"ping")
    await connection.receive_some(10)
    async with trio.open_nursery() as nursery:  # trio registers the descriptor for a read
        nursery.start_soon(connection.receive_some, 10)
        await trio.testing.wait_all_tasks_blocked()
        peer.sendall(b"pong")
    descriptor = connection.fileno()
    connection.close()
    peer.close()
    again, other = connected_pair()
    assert again.fileno() == descriptor
    received: list[bytes] = []

    async def read() -> None:
        received.append(await again.receive_some(10))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            other.sendall(b"hello")
    assert received == [b"hello"]
    again.close()
    other.close()


async def test_a_closed_socket_that_outlives_its_descriptor_never_wakes_the_next_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A wait cancelled by its caller leaves the descriptor armed in trio's epoll set; the
    socket may outlive the Connection's descriptor (a copy held elsewhere, as a forked
    child holds it until exec). Closing tells trio, so when that socket hangs up later, a
    wait on the next socket given the same descriptor is not woken by it."""
    connection, peer = connected_pair()
    # The socket outlives the connection's descriptor (a copy above the next free one).
    copy = fcntl.fcntl(connection.fileno(), fcntl.F_DUPFD_CLOEXEC, 1000)
    with trio.move_on_after(1):
        await connection.receive_some(10)
    descriptor = connection.fileno()
    connection.close()
    again, other = connected_pair()
    assert again.socket.fileno() == descriptor
    woken: list[bool] = []

    async def wait() -> None:
        await trio.lowlevel.wait_readable(again.socket)
        woken.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        peer.close()  # the old socket hangs up (EPOLLHUP for its entry, if trio kept one)
        await trio.sleep(1)
        assert woken == []
        nursery.cancel_scope.cancel()
    os.close(copy)
    other.close()
    again.close()
