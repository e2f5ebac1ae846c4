"""The edge-triggered reactor behind Connection waits: registered once, readiness never lost
(kept across waits, cleared only by EAGAIN or a short read), and close, cancel and deadlines
wake exactly the waits they concern."""

from __future__ import annotations

import fcntl
import math
import os
import socket

import pytest
import trio
import trio.testing
from counting_sockets import counting_pair

from egressd.net import readiness
from egressd.net.connection import Connection
from egressd.net.splice import Traffic, relay


def registered() -> list[int]:
    """The descriptors in this run's reactor epoll set, as the kernel lists them."""
    epoll_fd = readiness._REACTOR.get().epoll.fileno()
    with open(f"/proc/self/fdinfo/{epoll_fd}") as info:
        return [int(line.split()[1]) for line in info if line.startswith("tfd:")]


async def read_while(connection: Connection, send: socket.socket, data: bytes) -> bytes:
    """``data`` sent by the peer once a read on ``connection`` waits; what it read."""
    received: list[bytes] = []

    async def read() -> None:
        received.append(await connection.receive_some(100))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            send.sendall(data)
    return received[0]


async def test_a_connection_is_registered_once_for_all_its_waits_and_removed_at_close() -> None:
    connection, _, peer = counting_pair()
    for reply in (b"220 hi\r\n", b"250 ok\r\n", b"221 bye\r\n"):
        assert await read_while(connection, peer, reply) == reply
        assert registered() == [connection.fileno()]
    connection.close()
    assert registered() == []
    peer.close()


async def test_a_read_that_meets_eagain_waits_and_is_woken_by_the_next_bytes() -> None:
    connection, counting, peer = counting_pair()
    assert await read_while(connection, peer, b"hello") == b"hello"
    assert counting.recvs == 2  # EAGAIN, then the bytes
    connection.close()
    peer.close()


async def test_readiness_that_came_while_no_task_waited_is_kept_for_the_next_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A wait cancelled by its caller, then bytes: the event is recorded, and the next read
    takes the bytes with one recv and no wait."""
    connection, counting, peer = counting_pair()
    with trio.move_on_after(1):
        await connection.receive_some(100)
    assert counting.recvs == 1  # EAGAIN
    peer.sendall(b"later")
    await trio.testing.wait_all_tasks_blocked()  # the reactor records the event
    assert await connection.receive_some(100) == b"later"
    assert counting.recvs == 2
    connection.close()
    peer.close()


async def test_after_a_short_read_the_next_read_waits_for_a_new_event() -> None:
    connection, counting, peer = counting_pair()
    assert await read_while(connection, peer, b"one") == b"one"
    before = counting.recvs
    assert await read_while(connection, peer, b"two") == b"two"
    assert counting.recvs == before + 1  # no recv before the wait
    connection.close()
    peer.close()


@pytest.mark.parametrize("read_first", [True, False])
async def test_bytes_then_the_eof_in_one_event_are_both_read(read_first: bool) -> None:
    """The last reply and the peer's FIN come together: the reply is a short read, yet the
    read after it finds the EOF (no further event will come for it)."""
    connection, _, peer = counting_pair()
    if read_first:  # registered already when the bytes and the FIN arrive
        assert await read_while(connection, peer, b"250 ok\r\n") == b"250 ok\r\n"
    peer.sendall(b"221 bye\r\n")
    peer.shutdown(socket.SHUT_WR)
    await trio.testing.wait_all_tasks_blocked()
    with trio.fail_after(5):
        assert await connection.receive_some(100) == b"221 bye\r\n"
        assert await connection.receive_some(100) == b""
        assert await connection.receive_some(100) == b""
    connection.close()
    peer.close()


async def test_a_write_that_meets_a_full_buffer_waits_until_the_peer_reads() -> None:
    connection, _, peer = counting_pair()
    peer.setblocking(False)
    chunk = b"x" * 65536
    sent = 0
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def write() -> None:
                nonlocal sent
                for _ in range(16):  # more than the socket pair's buffers hold
                    await connection.send_all(chunk)
                    sent += len(chunk)

            nursery.start_soon(write)
            received = 0
            while received < 16 * len(chunk):
                await trio.testing.wait_all_tasks_blocked()
                try:
                    received += len(peer.recv(1 << 20))
                except BlockingIOError:
                    continue
    assert sent == received == 16 * len(chunk)
    connection.close()
    peer.close()


async def test_closing_wakes_a_read_and_a_write_waiting_with_closed_and_unregisters() -> None:
    connection, _, peer = counting_pair()
    woken: list[str] = []

    async def read() -> None:
        with pytest.raises(trio.ClosedResourceError):
            await connection.receive_some(10)
        woken.append("read")

    async def write() -> None:
        with pytest.raises(trio.ClosedResourceError):
            while True:
                await connection.send_all(b"x" * 65536)
        woken.append("write")

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(write)
            await trio.testing.wait_all_tasks_blocked()
            assert registered() == [connection.fileno()]
            connection.close()
    assert sorted(woken) == ["read", "write"]
    assert registered() == []
    peer.close()


async def test_a_cancelled_wait_leaves_the_connection_working(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection, _, peer = counting_pair()
    with trio.CancelScope() as scope:
        scope.deadline = trio.current_time() + 1
        await connection.receive_some(10)
    assert scope.cancelled_caught
    assert await read_while(connection, peer, b"after") == b"after"  # the slot is free again
    connection.close()
    peer.close()


async def test_a_late_read_raises_too_slow_while_a_write_on_its_socket_waits_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The read's deadline wakes only the read; the write, without a limit of its own
    since it began before the limit was set, finishes when the peer reads."""
    connection, _, peer = counting_pair()
    peer.setblocking(False)
    events: list[tuple[str, float]] = []

    async def write() -> None:
        for _ in range(16):
            await connection.send_all(b"x" * 65536)
        events.append(("wrote", trio.current_time()))

    async def read() -> None:
        connection.time_limit(5)
        with pytest.raises(trio.TooSlowError):
            await connection.receive_some(10)
        events.append(("too slow", trio.current_time()))
        connection.time_limit(math.inf)  # the write may take its time
        await trio.sleep(5)
        while True:  # now the peer drains the write
            try:
                peer.recv(1 << 20)
            except BlockingIOError:
                if events[-1][0] == "wrote":
                    return
                await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        await trio.testing.wait_all_tasks_blocked()  # the write waits, with no limit
        nursery.start_soon(read)
    assert events[0] == ("too slow", 5)
    assert events[1][0] == "wrote" and events[1][1] >= 10
    connection.close()
    peer.close()


async def test_a_reused_descriptor_is_not_woken_by_the_closed_socket_a_copy_keeps_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The kernel keeps an epoll registration while any copy of the file lives (a forked
    child's until exec): closing takes it out first, so the socket given the same number
    next is woken only by its own peer."""
    connection, _, peer = counting_pair()
    copy = fcntl.fcntl(connection.fileno(), fcntl.F_DUPFD_CLOEXEC, 1000)
    assert await read_while(connection, peer, b"one") == b"one"  # registered
    descriptor = connection.fileno()
    connection.close()
    again, counting, other = counting_pair()
    assert again.fileno() == descriptor

    async def read() -> bytes:
        return await again.receive_some(10)

    received: list[bytes] = []
    async with trio.open_nursery() as nursery:

        async def reader() -> None:
            received.append(await read())

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        recvs = counting.recvs
        peer.sendall(b"to the old socket")  # readable, through the copy
        peer.close()
        await trio.sleep(1)
        assert counting.recvs == recvs  # not woken
        other.sendall(b"mine")
    assert received == [b"mine"]
    assert registered() == [descriptor]
    os.close(copy)
    again.close()
    other.close()


async def test_a_spliced_connection_leaves_the_reactor() -> None:
    """A socket handed to the splice reactor is watched there only: no events here for its
    traffic, no kernel memory here while the spliced session idles."""
    listener = socket.create_server(("127.0.0.1", 0))
    sockets = []
    for _ in range(2):
        dialed = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        sockets.append((Connection(accepted), dialed))
    (client, client_app), (remote, remote_app) = sockets
    assert await read_while(client, client_app, b"EHLO x\r\n") == b"EHLO x\r\n"
    assert registered() == [client.fileno()]
    results = []
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                results.append(await relay(client, remote, traffic=Traffic(), idle_timeout=None))

            nursery.start_soon(run)
            await trio.testing.wait_all_tasks_blocked()
            assert registered() == []
            client_app.shutdown(socket.SHUT_WR)
            remote_app.shutdown(socket.SHUT_WR)
    assert results[0].outcome == "ok"
    for conn, app in sockets:
        conn.close()
        app.close()
    listener.close()
