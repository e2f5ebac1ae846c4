"""A Connection's waits never lose a wake-up, whatever comes between its calls.

A receive after a short read parks before its recv (the short read emptied the kernel's
queue), and the waits may move to an edge-triggered reactor, which hears of a change once.
So every way bytes, an EOF, a half-close or a reset can arrive is tried here at the two
moments that matter: while the task is parked, and between two calls (after a short read,
before the next receive, with the scheduler turning meanwhile). What a user would notice is
a session that hangs: each test runs under a time limit on the fake clock, so a lost
wake-up fails it at once instead of hanging the suite.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
from collections.abc import Awaitable, Callable
from functools import partial

import pytest
import trio
import trio.testing
import trustme

from egressd.net.connection import Connection
from egressd.net.splice import Traffic, relay

LIMIT = 5  # seconds on the fake clock: a lost wake-up makes it jump there and fail


def unix_pair() -> tuple[Connection, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Connection(ours), theirs


def tcp_pair() -> tuple[Connection, socket.socket]:
    """A loopback TCP connection: ours as a Connection, the peer's a blocking socket."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
    return Connection(client), peer


def reset(peer: socket.socket) -> None:
    """Close ``peer`` with an RST instead of a FIN (SO_LINGER on, zero seconds)."""
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()


async def raises(
    error: type[BaseException], call: Callable[..., Awaitable[object]], *args: object
) -> None:
    """Call ``call(*args)`` in a task of the test's nursery, which must raise ``error``."""
    with pytest.raises(error):
        await call(*args)


async def scheduler_turns() -> None:
    """Let the scheduler (and any reactor task) poll and dispatch the pending I/O events
    while this task waits on something else."""
    other, other_peer = unix_pair()
    other_peer.sendall(b".")
    for _ in range(3):
        await trio.testing.wait_all_tasks_blocked()
        assert await other.receive_some(10) in (b".", b"")
        other_peer.close()
    other.close()


async def short_read(connection: Connection, peer: socket.socket) -> None:
    """A read that gets fewer bytes than it asked for: the next one waits first."""
    peer.sendall(b"220 ready\r\n")
    assert await connection.receive_some(4096) == b"220 ready\r\n"


async def test_bytes_that_arrive_between_two_reads_are_received(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection, peer = unix_pair()
    with trio.fail_after(LIMIT):
        for turn in range(5):
            await short_read(connection, peer)
            peer.sendall(b"250 ok %d\r\n" % turn)  # before the next call ...
            await scheduler_turns()  # ... and after any poll that would report it
            assert await connection.receive_some(4096) == b"250 ok %d\r\n" % turn
    connection.close()
    peer.close()


async def test_bytes_that_arrive_while_parked_wake_the_reader(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection, peer = unix_pair()
    with trio.fail_after(LIMIT):
        await short_read(connection, peer)
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def read() -> None:
                got.append(await connection.receive_some(4096))

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            peer.sendall(b"250 ok\r\n")
        assert got == [b"250 ok\r\n"]
    connection.close()
    peer.close()


@pytest.mark.parametrize("parked", [True, False], ids=["while-parked", "between-calls"])
async def test_an_eof_is_received_and_received_again(
    autojump_clock: trio.testing.MockClock, parked: bool
) -> None:
    """An EOF after a short read ends the read with ``b""``, and every later read too (a
    driver may read again after it): the EOF is not an event heard once."""
    connection, peer = unix_pair()
    with trio.fail_after(LIMIT):
        await short_read(connection, peer)
        if parked:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(connection.receive_some, 4096)
                await trio.testing.wait_all_tasks_blocked()
                peer.shutdown(socket.SHUT_WR)
        else:
            peer.shutdown(socket.SHUT_WR)
            await scheduler_turns()
        for _ in range(3):
            assert await connection.receive_some(4096) == b""
    connection.close()
    peer.close()


async def test_bytes_then_eof_in_one_go_give_the_bytes_then_eof(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection, peer = unix_pair()
    with trio.fail_after(LIMIT):
        await short_read(connection, peer)
        peer.sendall(b"221 bye\r\n")
        peer.shutdown(socket.SHUT_WR)
        await scheduler_turns()
        assert await connection.receive_some(4096) == b"221 bye\r\n"
        assert await connection.receive_some(4096) == b""
    connection.close()
    peer.close()


async def test_after_the_peers_half_close_the_other_direction_still_works(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The peer's FIN ends our reads, not our writes: the last reply still goes out, and
    our own EOF reaches the peer after it."""
    connection, peer = tcp_pair()
    with trio.fail_after(LIMIT):
        await short_read(connection, peer)
        peer.shutdown(socket.SHUT_WR)
        assert await connection.receive_some(4096) == b""
        await connection.send_all(b"221 bye\r\n" * 2000)  # more than one send at once
        await connection.send_eof()
        received = b""
        peer.setblocking(False)
        while not received.endswith(b"\r\n") or len(received) < 18000:
            await trio.testing.wait_all_tasks_blocked()
            try:
                chunk = peer.recv(65536)
            except BlockingIOError:
                await trio.sleep(0.01)
                continue
            assert chunk, "the peer saw our EOF before our bytes"
            received += chunk
        assert received == b"221 bye\r\n" * 2000
    connection.close()
    peer.close()


@pytest.mark.parametrize("parked", [True, False], ids=["while-parked", "between-calls"])
async def test_a_reset_ends_the_read_with_a_broken_stream(
    autojump_clock: trio.testing.MockClock, parked: bool
) -> None:
    connection, peer = tcp_pair()
    with trio.fail_after(LIMIT):
        await short_read(connection, peer)
        if parked:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(raises, trio.BrokenResourceError, connection.receive_some)
                await trio.testing.wait_all_tasks_blocked()
                reset(peer)
        else:
            reset(peer)
            await scheduler_turns()
            await raises(trio.BrokenResourceError, connection.receive_some)
    connection.close()


async def test_a_reset_ends_a_write_waiting_for_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection, peer = tcp_pair()
    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            big = b"x" * (16 << 20)  # more than the buffers hold: the write waits for room
            nursery.start_soon(raises, trio.BrokenResourceError, connection.send_all, big)
            await trio.testing.wait_all_tasks_blocked()
            reset(peer)
    connection.close()


async def test_a_read_cancelled_while_parked_loses_no_bytes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection, peer = unix_pair()
    with trio.fail_after(LIMIT):
        await short_read(connection, peer)
        with trio.move_on_after(1) as scope:
            await connection.receive_some(4096)
        assert scope.cancelled_caught
        peer.sendall(b"250 late\r\n")
        await scheduler_turns()
        assert await connection.receive_some(4096) == b"250 late\r\n"
    connection.close()
    peer.close()


async def test_a_read_cancelled_after_its_bytes_arrived_leaves_them_for_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelled in the same turn as its bytes arrive, a read either returns them or
    leaves them in the socket: never consumes them and raises."""
    connection, peer = unix_pair()
    with trio.fail_after(LIMIT):
        await short_read(connection, peer)
        got = b""
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                nonlocal got
                with trio.CancelScope() as scope:
                    cancel_scopes.append(scope)
                    got = await connection.receive_some(4096)

            cancel_scopes: list[trio.CancelScope] = []
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            peer.sendall(b"250 raced\r\n")
            cancel_scopes[0].cancel()
        if not got:
            got = await connection.receive_some(4096)
        assert got == b"250 raced\r\n"
    connection.close()
    peer.close()


async def test_after_a_short_read_a_read_under_a_limit_ends_at_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection, peer = unix_pair()
    connection.time_limit(30)
    await short_read(connection, peer)  # found its bytes ready: the next wait is the first
    started = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await connection.receive_some(4096)
    assert trio.current_time() - started == 30
    connection.close()
    peer.close()


async def test_bytes_ready_after_the_deadline_passed_unwatched_are_taken(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A limit's deadline passes while the task does something else (no wait of it was
    in progress, so none reached it); the peer's bytes came meanwhile. The next read takes
    them, as a read that finds bytes ready completes whatever the limit. (Twenty times: a
    wait that races the deadline task for them loses about one time in two.)"""
    for _ in range(20):
        connection, peer = unix_pair()
        connection.time_limit(5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.receive_some, 4096)
            await trio.testing.wait_all_tasks_blocked()
            peer.sendall(b"220 ready\r\n")  # the first wait: the deadline is 5 s from now
        await trio.sleep(10)  # busy with the remote, past the deadline
        peer.sendall(b"250 ok\r\n")
        assert await connection.receive_some(4096) == b"250 ok\r\n"
        connection.close()
        peer.close()


async def test_close_wakes_a_read_parked_in_another_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    connection, peer = unix_pair()
    with trio.fail_after(LIMIT):
        await short_read(connection, peer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raises, trio.ClosedResourceError, connection.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            connection.close()
    peer.close()


async def test_a_descriptor_reused_after_close_hears_only_its_own_socket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A connection closed after a short read (its wait registered), and a new socket given
    the same descriptor number: the new connection's reads wait for its own bytes and get
    them."""
    old, old_peer = unix_pair()
    with trio.fail_after(LIMIT):
        await short_read(old, old_peer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(old.receive_some, 4096)
            await trio.testing.wait_all_tasks_blocked()
            old_peer.sendall(b"x")  # the wait ends: trio may keep the number registered
        number = old.fileno()
        old.close()
        fresh_ours, fresh_peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if fresh_ours.fileno() != number:  # pragma: no cover - the lowest free number
            pytest.skip("the kernel gave another descriptor number")
        fresh = Connection(fresh_ours)
        await short_read(fresh, fresh_peer)
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def read() -> None:
                got.append(await fresh.receive_some(4096))

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            fresh_peer.sendall(b"new")
        assert got == [b"new"]
    fresh.close()
    fresh_peer.close()
    old_peer.close()


async def test_many_connections_in_lock_step_all_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two hundred pairs of Connections exchange twenty lock-step lines each: every read
    after the first is after a short read, so each waits; none is left hanging."""
    pairs = []
    for _ in range(200):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pairs.append((Connection(a), Connection(b)))
    done = 0

    async def client(conn: Connection) -> None:
        for turn in range(20):
            await conn.send_all(b"NOOP %d\r\n" % turn)
            assert await conn.receive_some(4096) == b"250 %d\r\n" % turn

    async def server(conn: Connection) -> None:
        nonlocal done
        for turn in range(20):
            assert await conn.receive_some(4096) == b"NOOP %d\r\n" % turn
            await conn.send_all(b"250 %d\r\n" % turn)
        done += 1

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            for left, right in pairs:
                nursery.start_soon(client, left)
                nursery.start_soon(server, right)
    assert done == 200
    for left, right in pairs:
        left.close()
        right.close()


async def test_tls_over_connections_with_small_reads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """TLS reads what the record layer asks for (a header, then the rest): many short
    reads, each making the next wait first. A lock-step TLS dialogue and a large transfer
    both complete."""
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    client = trio.SSLStream(Connection(a), client_ctx, server_hostname="relay.test")
    server = trio.SSLStream(Connection(b), server_ctx, server_side=True)
    big = bytes(range(256)) * 4096  # 1 MiB

    async def serve() -> None:
        for turn in range(30):
            assert await server.receive_some(100) == b"CMD %d\r\n" % turn
            await server.send_all(b"250 %d\r\n" % turn)
        await server.send_all(big)

    with trio.fail_after(LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            for turn in range(30):
                await client.send_all(b"CMD %d\r\n" % turn)
                assert await client.receive_some(3) == b"250"
                assert await client.receive_some(100) == b" %d\r\n" % turn
            received = bytearray()
            while len(received) < len(big):
                received += await client.receive_some(7000)
            assert received == big
    await client.aclose()
    await server.aclose()


async def test_a_second_task_reading_at_once_is_refused_and_the_first_still_wakes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two tasks may not read one connection at once (a bug in the caller): the second is
    refused with BusyResourceError, as trio refuses it, and the first is not forgotten --
    it gets the bytes when they come instead of waiting forever."""
    connection, peer = unix_pair()
    with trio.fail_after(LIMIT):
        await short_read(connection, peer)
        got: list[bytes] = []

        async def first() -> None:
            got.append(await connection.receive_some(4096))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await connection.receive_some(4096)
            peer.sendall(b"250 first\r\n")
        assert got == [b"250 first\r\n"]
    connection.close()
    peer.close()


@pytest.mark.parametrize("size", [1, 3, 9, 10])
@pytest.mark.parametrize("pair", [unix_pair, tcp_pair], ids=["unix", "tcp"])
async def test_bytes_and_eof_read_in_small_pieces_give_every_byte_then_eof(
    autojump_clock: trio.testing.MockClock,
    size: int,
    pair: Callable[[], tuple[Connection, socket.socket]],
) -> None:
    """The peer's last bytes and its FIN come together and are read a few bytes at a time
    (a read that fills its buffer, then a short one that still leaves the EOF behind): no
    later event will announce that EOF, yet every byte and then ``b""`` come."""
    connection, peer = pair()
    with trio.fail_after(LIMIT):
        await short_read(connection, peer)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.receive_some, 1)  # parked: registered, if ever
            await trio.testing.wait_all_tasks_blocked()
            peer.sendall(b"2")
        peer.sendall(b"21 bye\r\n")
        peer.shutdown(socket.SHUT_WR)
        await scheduler_turns()
        received = b""
        while chunk := await connection.receive_some(size):
            received += chunk
        assert received == b"21 bye\r\n"
        assert await connection.receive_some(size) == b""
    connection.close()
    peer.close()


async def test_connections_that_waited_are_spliced_whole_and_their_numbers_reused_cleanly() -> None:
    """The SOCKS5 door's shape: each side's Connection waits for a greeting first (so it
    is watched, if waits have a watcher), then the sockets go to the splice path. Every
    byte goes through both ways, both ends see the EOF, and a connection given one of
    the closed sockets' numbers next waits for its own bytes and gets them."""
    client, client_app = tcp_pair()
    remote, remote_app = tcp_pair()
    for connection, app in ((client, client_app), (remote, remote_app)):
        await short_read(connection, app)
    up, down = bytes(range(256)) * 4096, b"down" * 300_000
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            traffic = Traffic()
            nursery.start_soon(
                partial(relay, client, remote, traffic=traffic, idle_timeout=None, zero_copy=True)
            )
            got_up, got_down = await trio.to_thread.run_sync(
                exchange, client_app, remote_app, up, down
            )
        assert (got_up, got_down) == (up, down)
        assert (traffic.up, traffic.down) == (len(up), len(down))
        numbers = {client.fileno(), remote.fileno()}
        client.close()
        remote.close()
        fresh, fresh_peer = tcp_pair()
        if fresh.fileno() not in numbers:  # pragma: no cover - the lowest free numbers
            pytest.skip("the kernel gave other descriptor numbers")
        await short_read(fresh, fresh_peer)
        async with trio.open_nursery() as nursery:
            got: list[bytes] = []

            async def read() -> None:
                got.append(await fresh.receive_some(4096))

            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            fresh_peer.sendall(b"250 fresh\r\n")
        assert got == [b"250 fresh\r\n"]
    fresh.close()
    for sock in (client_app, remote_app, fresh_peer):
        sock.close()


def exchange(
    client_app: socket.socket, remote_app: socket.socket, up: bytes, down: bytes
) -> tuple[bytes, bytes]:
    """In a thread (blocking sockets): each app sends its bytes and EOF and reads the
    other's to EOF; what each received."""
    received: dict[str, bytes] = {}

    def run(name: str, sock: socket.socket, data: bytes) -> None:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
        received[name] = b"".join(chunks)

    threads = [
        threading.Thread(target=run, args=("down", client_app, up)),
        threading.Thread(target=run, args=("up", remote_app, down)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    return received["up"], received["down"]
