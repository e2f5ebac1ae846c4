"""The relay between two real loopback TCP connections, on both the splice and trio paths.

Layout of every test: ``client_app <-> [relay] <-> remote_app``, i.e. two TCP connections
whose inner ends the relay owns.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from harness import read_to_eof

from egressd.net import zerocopy
from egressd.net.splice import RelayResult, Traffic, can_splice, relay
from egressd.net.zerocopy import SplicedPair

PATHS = [pytest.param(True, id="splice"), pytest.param(False, id="trio")]


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Both ends of one loopback TCP connection."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listeners[0] as listener:
        port = listener.socket.getsockname()[1]
        dialer = await trio.open_tcp_stream("127.0.0.1", port)
        accepted = await listener.accept()
    assert isinstance(accepted, trio.SocketStream)
    return dialer, accepted


@dataclass
class Relayed:
    client_app: trio.SocketStream
    remote_app: trio.SocketStream
    traffic: Traffic = field(default_factory=Traffic)
    result: RelayResult | None = None
    done: trio.Event = field(default_factory=trio.Event)


@asynccontextmanager
async def relayed(
    zero_copy: bool,
    *,
    idle_timeout: float | None = None,
    to_remote_first: bytes = b"",
    to_client_first: bytes = b"",
) -> AsyncIterator[Relayed]:
    client_app, client_end = await tcp_pair()
    remote_end, remote_app = await tcp_pair()
    state = Relayed(client_app, remote_app)

    async def run() -> None:
        try:
            state.result = await relay(
                client_end,
                remote_end,
                traffic=state.traffic,
                idle_timeout=idle_timeout,
                to_remote_first=to_remote_first,
                to_client_first=to_client_first,
                zero_copy=zero_copy,
            )
        finally:
            state.done.set()
            await client_end.aclose()
            await remote_end.aclose()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            yield state
            nursery.cancel_scope.cancel()
    finally:
        # Outside the nursery: a checkpoint in a cancelled scope would swallow the error.
        await trio.aclose_forcefully(client_app)
        await trio.aclose_forcefully(remote_app)


@pytest.mark.parametrize("zero_copy", PATHS)
async def test_both_directions_at_once_arrive_intact_and_are_counted(zero_copy: bool) -> None:
    up, down = os.urandom(5 << 20), os.urandom(3 << 20)
    received: dict[str, bytes] = {}
    async with relayed(zero_copy) as r:

        async def talk(name: str, stream: trio.SocketStream, data: bytes) -> None:
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    await stream.send_all(data)
                    await stream.send_eof()

                nursery.start_soon(send)
                received[name] = await read_to_eof(stream)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(talk, "client", r.client_app, up)
                nursery.start_soon(talk, "remote", r.remote_app, down)
            await r.done.wait()
    assert received["remote"] == up
    assert received["client"] == down
    assert (r.traffic.up, r.traffic.down) == (len(up), len(down))
    assert r.result == RelayResult("ok")


@pytest.mark.parametrize("zero_copy", PATHS)
async def test_half_close_lets_the_last_reply_through(zero_copy: bool) -> None:
    """The client sends QUIT and shuts its write side; the 221 that follows still arrives."""
    async with relayed(zero_copy) as r:
        with trio.fail_after(10):
            await r.client_app.send_all(b"QUIT\r\n")
            await r.client_app.send_eof()
            assert await read_to_eof(r.remote_app) == b"QUIT\r\n"
            await trio.sleep(0.05)  # the remote answers a moment after the client's EOF
            await r.remote_app.send_all(b"221 bye\r\n")
            await r.remote_app.send_eof()
            assert await read_to_eof(r.client_app) == b"221 bye\r\n"
            await r.done.wait()
    assert r.result == RelayResult("ok")


@pytest.mark.parametrize("zero_copy", PATHS)
async def test_bytes_already_read_go_first_and_count(zero_copy: bool) -> None:
    async with relayed(
        zero_copy, to_remote_first=b"EHLO a\r\n", to_client_first=b"220 hi\r\n"
    ) as r:
        with trio.fail_after(10):
            await r.client_app.send_all(b"QUIT\r\n")
            await r.client_app.send_eof()
            assert await read_to_eof(r.remote_app) == b"EHLO a\r\nQUIT\r\n"
            await r.remote_app.send_eof()
            assert await read_to_eof(r.client_app) == b"220 hi\r\n"
            await r.done.wait()
    assert (r.traffic.up, r.traffic.down) == (14, 8)


@pytest.mark.parametrize("zero_copy", PATHS)
async def test_silence_ends_the_relay_after_the_idle_timeout_not_before(zero_copy: bool) -> None:
    async with relayed(zero_copy, idle_timeout=0.3) as r:
        started = trio.current_time()
        with trio.fail_after(5):
            for _ in range(6):  # 0.6 s of trickling traffic keeps it alive
                await r.client_app.send_all(b".")
                last_sent = trio.current_time()
                await trio.sleep(0.1)
            assert await r.remote_app.receive_some(100)
            assert not r.done.is_set()
            await r.done.wait()
            silent_for = trio.current_time() - last_sent
            # The owner closed both ends: the applications see EOF.
            assert await read_to_eof(r.client_app) == b""
    assert trio.current_time() - started > 0.6
    assert silent_for >= 0.3  # counted from the last byte, which the relay saw after it left
    assert r.result is not None and r.result.outcome == "idle_timeout"
    assert r.traffic.up == 6


def reset(stream: trio.SocketStream) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


@pytest.mark.parametrize("zero_copy", PATHS)
async def test_a_reset_ends_both_directions(zero_copy: bool) -> None:
    async with relayed(zero_copy) as r:
        with trio.fail_after(5):
            await r.client_app.send_all(b"hello")
            assert await r.remote_app.receive_some(100) == b"hello"
            reset(r.remote_app)
            await r.done.wait()
            # The client is not left hanging: its connection ends (EOF or a reset).
            with contextlib.suppress(trio.BrokenResourceError):
                assert await read_to_eof(r.client_app) == b""
    assert r.result is not None and r.result.outcome == "reset"
    assert r.result.detail is not None and "remote" in r.result.detail


@pytest.mark.parametrize("zero_copy", PATHS)
@pytest.mark.parametrize("resetting", ["remote", "client"])
async def test_a_reset_reaches_the_other_side_as_a_reset_not_an_eof(
    zero_copy: bool, resetting: str
) -> None:
    """An aborted transfer must not look complete: the other side gets a RST too."""
    async with relayed(zero_copy) as r:
        resetter, other = (
            (r.remote_app, r.client_app) if resetting == "remote" else (r.client_app, r.remote_app)
        )
        with trio.fail_after(5):
            await resetter.send_all(b"partial transfer")
            assert await other.receive_some(100) == b"partial transfer"
            reset(resetter)
            await r.done.wait()
            with pytest.raises(trio.BrokenResourceError) as raised:
                await read_to_eof(other)
    assert isinstance(raised.value.__cause__, ConnectionResetError)
    assert r.result is not None and r.result.outcome == "reset"
    assert r.result.detail is not None and resetting in r.result.detail


async def test_idle_spliced_connections_hold_no_pipe() -> None:
    """Each idle connection costs its two sockets only; pipes are pooled per chunk."""

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async with relayed(True) as warm:  # fill the pipe pool once
        await warm.client_app.send_all(b"x")
        await warm.remote_app.receive_some(10)
    before = open_fds()
    count = 20
    async with trio.open_nursery() as nursery:
        opened: list[Relayed] = []

        async def one() -> None:
            async with relayed(True) as r:
                await r.client_app.send_all(b"ping")
                assert await r.remote_app.receive_some(10) == b"ping"
                opened.append(r)
                await trio.sleep_forever()

        for _ in range(count):
            nursery.start_soon(one)
        with trio.fail_after(5):
            while len(opened) < count:
                await trio.sleep(0.01)
        during = open_fds()
        nursery.cancel_scope.cancel()
    # 4 sockets per relayed pair (two TCP connections, both ends in this process).
    assert during - before <= 4 * count + 2


async def quit_through_the_trio_path(
    client_app: trio.abc.HalfCloseableStream,
    client_end: trio.abc.HalfCloseableStream,
    remote_end: trio.abc.HalfCloseableStream,
    remote_app: trio.abc.HalfCloseableStream,
    traffic: Traffic,
) -> RelayResult:
    """QUIT and its reply relayed between ``client_end`` and ``remote_end``, each side
    half-closing after its line; what the relay returned."""
    results: list[RelayResult] = []
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            results.append(await relay(client_end, remote_end, traffic=traffic, idle_timeout=None))

        nursery.start_soon(run)
        with trio.fail_after(5):
            await client_app.send_all(b"QUIT\r\n")
            await client_app.send_eof()
            assert await read_to_eof(remote_app) == b"QUIT\r\n"
            await remote_app.send_all(b"221 bye\r\n")
            await remote_app.send_eof()
            assert await read_to_eof(client_app) == b"221 bye\r\n"
    [result] = results
    return result


async def test_the_trio_path_relays_any_half_closeable_stream() -> None:
    client_app, client_end = trio.testing.memory_stream_pair()
    remote_end, remote_app = trio.testing.memory_stream_pair()
    traffic = Traffic()
    assert not can_splice(client_end, remote_end)
    with pytest.raises(ValueError):
        await relay(client_end, remote_end, traffic=traffic, idle_timeout=None, zero_copy=True)
    ends = (client_app, client_end, remote_end, remote_app)
    assert await quit_through_the_trio_path(*ends, traffic) == RelayResult("ok")


async def test_a_relay_cancelled_midway_leaves_the_splice_reactor_serving_the_next() -> None:
    """A drain or shutdown cancels spliced sessions in flight; the next ones still flow."""
    async with relayed(True) as first:
        await first.client_app.send_all(b"one")
        with trio.fail_after(5):
            assert await first.remote_app.receive_some(10) == b"one"
    # Leaving the block cancelled the first relay in the middle of its session.
    assert first.result is None and first.traffic.up == 3
    for _ in range(3):  # the next pairs get the same descriptor numbers back
        async with relayed(True) as following:
            await following.client_app.send_all(b"two")
            with trio.fail_after(5):
                assert await following.remote_app.receive_some(10) == b"two"
                await following.remote_app.send_all(b"reply")
                assert await following.client_app.receive_some(10) == b"reply"


async def test_a_shorter_idle_timeout_ends_on_time_beside_longer_ones() -> None:
    """The reactor's one timer wakes for a pair due before every pair it already holds."""
    async with relayed(True, idle_timeout=600) as patient, relayed(True, idle_timeout=0.3) as quick:
        await patient.client_app.send_all(b"x")
        with trio.fail_after(5):
            assert await patient.remote_app.receive_some(10) == b"x"
            await quick.done.wait()
        assert quick.result is not None and quick.result.outcome == "idle_timeout"
        assert not patient.done.is_set()
        await patient.client_app.send_all(b"still here")
        with trio.fail_after(5):
            assert await patient.remote_app.receive_some(20) == b"still here"


async def test_finished_spliced_sessions_are_not_kept_for_their_idle_timeout() -> None:
    """Sessions that end long before their idle timeout leave nothing behind in the reactor
    (its timers would otherwise hold every pair, and its sockets, for idle_timeout)."""

    def live_pairs() -> int:
        return sum(isinstance(o, SplicedPair) for o in gc.get_objects())

    sessions = 300
    for _ in range(sessions):
        async with relayed(True, idle_timeout=600) as r:
            with trio.fail_after(5):
                await r.client_app.send_all(b"QUIT\r\n")
                await r.client_app.send_eof()
                assert await read_to_eof(r.remote_app) == b"QUIT\r\n"
                await r.remote_app.send_eof()
                await r.done.wait()
            assert r.result == RelayResult("ok")
    gc.collect()
    assert live_pairs() <= sessions // 2


def test_the_pipe_pool_keeps_only_full_size_pipes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pipe the kernel would not grow (the user's pipe quota used up) is closed when it
    comes back, so the next chunk gets a new pipe, of full size once there is room again."""
    pool = zerocopy._PipePool(keep=4)
    full = pool.take()
    assert fcntl.fcntl(full[1], zerocopy._F_GETPIPE_SZ) == zerocopy.PIPE_SIZE
    monkeypatch.setattr(zerocopy, "_F_SETPIPE_SZ", -1)  # fcntl then fails, as with EPERM
    small = pool.take()
    pool.give(small)
    pool.give(full)
    assert pool.free == [full]
    for fd in small:
        with pytest.raises(OSError):
            os.fstat(fd)
    pool.discard(full)


def test_the_bulk_send_buffer_is_set_only_where_it_beats_autotuning() -> None:
    """Linux doubles SO_SNDBUF, caps it at wmem_max, and stops autotuning a socket whose
    buffer was set: a fixed buffer smaller than autotuning's maximum would be slower."""
    mib = 1 << 20
    assert zerocopy.bulk_send_buffer(4 * mib, 4 * mib, 4 * mib) == 4 * mib  # 8 MiB > 4 MiB
    assert zerocopy.bulk_send_buffer(4 * mib, 16 * mib, 4 * mib) == 4 * mib
    assert zerocopy.bulk_send_buffer(4 * mib, 3 * mib, 4 * mib) == 3 * mib  # 6 MiB > 4 MiB
    assert zerocopy.bulk_send_buffer(4 * mib, 2 * mib, 4 * mib) == 0  # 4 MiB: no gain
    assert zerocopy.bulk_send_buffer(4 * mib, 212992, 4 * mib) == 0  # Debian's wmem_max


async def test_only_a_direction_that_fills_a_pipe_gets_the_bulk_send_buffer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upload raises the remote socket's send buffer; the short reply coming back leaves
    the client socket's as the kernel made it."""
    pool = zerocopy._PipePool(keep=4)  # small pipes must not stay in the shared pool
    monkeypatch.setattr(zerocopy, "_PIPES", pool)
    monkeypatch.setattr(zerocopy, "PIPE_SIZE", 16 << 10)
    monkeypatch.setattr(zerocopy, "_BULK_SNDBUF", 64 << 10)
    client_app, client_end = await tcp_pair()
    remote_end, remote_app = await tcp_pair()

    def send_buffer(stream: trio.SocketStream) -> int:
        return stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    client_before = send_buffer(client_end)
    upload = os.urandom(48 << 10)
    try:
        with trio.fail_after(10):
            await client_app.send_all(upload)  # queued before the relay's first read
            await client_app.send_eof()
            async with trio.open_nursery() as nursery:
                pair = SplicedPair(
                    client_end.socket, remote_end.socket, traffic=Traffic(), idle_timeout=None
                )
                nursery.start_soon(pair.run)
                assert await read_to_eof(remote_app) == upload
                await remote_app.send_all(b"250 ok\r\n")
                await remote_app.send_eof()
                assert await read_to_eof(client_app) == b"250 ok\r\n"
        assert send_buffer(remote_end) == 2 * (64 << 10)
        assert send_buffer(client_end) == client_before
    finally:
        for stream in (client_app, client_end, remote_end, remote_app):
            await trio.aclose_forcefully(stream)
        for pipe in pool.free:
            pool.discard(pipe)


async def test_connections_say_whether_they_can_be_spliced() -> None:
    """A Connection knows it is TCP (from TCP_NODELAY, without reading its family): two
    TCP ones splice; a Unix one takes the portable path, and zero-copy is refused."""
    from egressd.net.connection import Connection

    listener = socket.create_server(("127.0.0.1", 0))
    dialed = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    unix_a, unix_b = socket.socketpair()
    tcp_a, tcp_b = Connection(dialed), Connection(accepted)
    unix_end, unix_app = Connection(unix_a), Connection(unix_b)
    try:
        assert tcp_a.tcp and tcp_b.tcp
        assert not unix_end.tcp
        assert can_splice(tcp_a, tcp_b)
        assert not can_splice(tcp_a, unix_end)
        with pytest.raises(ValueError):
            await relay(tcp_a, unix_end, traffic=Traffic(), idle_timeout=None, zero_copy=True)
        traffic = Traffic()
        ends = (unix_app, unix_end, tcp_a, tcp_b)
        assert await quit_through_the_trio_path(*ends, traffic) == RelayResult("ok")
        assert (traffic.up, traffic.down) == (6, 9)
    finally:
        for stream in (tcp_a, tcp_b, unix_end, unix_app):
            stream.close()
        listener.close()
