"""sd_notify over a real unix datagram socket standing in for systemd's $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from egressd.net import sdnotify


class Receiver:
    """A bound datagram socket playing systemd's side."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)

    def receive(self, timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def drain(self) -> list[str]:
        self.sock.setblocking(False)
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return messages


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    # A short directory: sun_path holds at most 107 bytes.
    with tempfile.TemporaryDirectory(prefix="sdn-") as directory:
        path = os.path.join(directory, "notify")
        receiver = Receiver(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        try:
            yield receiver
        finally:
            receiver.sock.close()


def test_no_socket_means_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    assert sdnotify.watchdog_interval() is None


def test_ready_stopping_watchdog_status(receiver: Receiver) -> None:
    assert sdnotify.ready()
    assert receiver.receive() == "READY=1"
    assert sdnotify.ready("serving 3 pools")
    assert receiver.receive() == "READY=1\nSTATUS=serving 3 pools"
    assert sdnotify.stopping()
    assert receiver.receive() == "STOPPING=1"
    assert sdnotify.watchdog()
    assert receiver.receive() == "WATCHDOG=1"
    assert sdnotify.status("line one\nline two")
    assert receiver.receive() == "STATUS=line one line two"


def test_reloading_carries_a_monotonic_timestamp(receiver: Receiver) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = receiver.receive().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"egressd-test-{uuid.uuid4().hex}"
    receiver = Receiver("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert receiver.receive() == "READY=1"
    finally:
        receiver.sock.close()


def test_missing_socket_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent"))
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("200000", None, 0.2),
        ("30000000", "self", 30.0),
        ("30000000", "1", None),
        ("0", None, None),
        ("garbage", None, None),
        (None, None, None),
    ],
)
def test_watchdog_interval(
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    usec: str | None,
    pid: str | None,
    expected: float | None,
) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert sdnotify.watchdog_interval() == expected


async def test_watchdog_loop_pings_at_half_the_interval(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    async with trio.open_nursery() as nursery:
        period = await nursery.start(sdnotify.watchdog_loop)
        assert period == pytest.approx(0.1)
        await trio.sleep(0.95)  # pings at 0.0, 0.1, ..., 0.9
        nursery.cancel_scope.cancel()
    assert receiver.drain() == ["WATCHDOG=1"] * 10


async def test_watchdog_loop_on_the_real_clock(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three pings arrive, never closer together than the period of 0.1 s: n pings take at
    least n - 1 periods of the elapsed time, however late a busy machine runs each one."""
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    pings: list[str] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            start = time.monotonic()
            await nursery.start(sdnotify.watchdog_loop)
            while len(pings) < 3:
                await trio.sleep(0.01)
                pings += receiver.drain()
            elapsed = time.monotonic() - start
            nursery.cancel_scope.cancel()
    assert set(pings) == {"WATCHDOG=1"}
    assert (len(pings) - 1) * 0.1 <= elapsed, f"{len(pings)} pings in {elapsed:.3f} s"


async def test_watchdog_loop_returns_when_the_watchdog_is_off(receiver: Receiver) -> None:
    with trio.fail_after(1):
        async with trio.open_nursery() as nursery:
            assert await nursery.start(sdnotify.watchdog_loop) is None
    assert receiver.drain() == []
