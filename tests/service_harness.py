"""Run the real daemon (``python -m egressd run -c FILE``) as systemd would, for service tests.

Theory of operation
-------------------
:func:`daemon_process` binds a unix datagram socket standing in for systemd's
``$NOTIFY_SOCKET``, starts ``python -m egressd run -c FILE`` in a session of its own with
that socket in its environment (and ``WATCHDOG_USEC`` when asked), and returns once
``READY=1`` arrived - never after a sleep. The daemon's stderr goes to a file, so a test can
assert on the log (:meth:`DaemonProcess.log`) and a failure shows it. Signals go to the
daemon's PID; at exit a daemon still running gets SIGTERM, then SIGKILL, by PID.

Every notification is kept in :attr:`NotifySocket.history`; :meth:`NotifySocket.wait_for`
consumes them in order, so a test can assert READY=1, RELOADING=1, READY=1, STOPPING=1
arrive in that order. Timeouts belong to the caller: wrap waits in ``trio.fail_after``.

Also here: :func:`socks_connect`, a minimal SOCKS5 client built on egressd's own sans-IO
client, and :func:`scrape` / :func:`sample`, to read the metrics endpoint.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from egressd.proto import socks5

REPO = Path(__file__).resolve().parent.parent


class NotifySocket:
    """systemd's side of sd_notify: a bound datagram socket, read from trio."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.history: list[str] = []
        """Every datagram received so far, in order."""
        self._consumed = 0

    async def bind(self) -> None:
        await self.sock.bind(self.path)

    def close(self) -> None:
        self.sock.close()

    async def receive(self) -> str:
        """The next datagram not yet consumed by :meth:`wait_for` (waits for one)."""
        if self._consumed == len(self.history):
            data = await self.sock.recv(65536)
            self.history.append(data.decode())
        message = self.history[self._consumed]
        self._consumed += 1
        return message

    async def wait_for(self, assignment: str) -> str:
        """Consume datagrams until one holds the line ``assignment`` (e.g. ``READY=1``)."""
        while True:
            message = await self.receive()
            if assignment in message.split("\n"):
                return message

    def states(self) -> list[str]:
        """The first line of every datagram received, WATCHDOG=1 pings left out."""
        return [m.split("\n")[0] for m in self.history if m != "WATCHDOG=1"]


@dataclass
class DaemonProcess:
    """A running ``egressd run``."""

    popen: subprocess.Popen[bytes]
    config: Path
    log_path: Path
    notify: NotifySocket
    returncode: int | None = field(default=None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        """Everything the daemon wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    def send(self, signum: signal.Signals) -> None:
        os.kill(self.pid, signum)

    def running(self) -> bool:
        return self.popen.poll() is None

    async def wait_exit(self) -> int:
        """Wait until the process exited; its exit status (wrap in ``trio.fail_after``)."""
        while (code := self.popen.poll()) is None:
            await trio.sleep(0.02)
        self.returncode = code
        return code

    async def reload(self) -> None:
        """SIGHUP, then wait for RELOADING=1 and the READY=1 that ends the reload."""
        self.send(signal.SIGHUP)
        await self.notify.wait_for("RELOADING=1")
        await self.notify.wait_for("READY=1")


@asynccontextmanager
async def daemon_process(
    config: Path,
    *,
    watchdog_usec: int | None = None,
    watchdog_pid_self: bool = False,
    args: tuple[str, ...] = (),
    ready_timeout: float = 15.0,
    journal: bool = False,
    open_files: int | None = None,
    inherit: tuple[socket.socket, ...] = (),
) -> AsyncIterator[DaemonProcess]:
    """Start ``python -m egressd run -c config``; yield after READY=1; stop it by PID.

    ``open_files`` sets the daemon's RLIMIT_NOFILE (soft and hard, with ``prlimit``), to
    run it out of descriptors without touching the rest of the machine.

    ``journal`` sets ``JOURNAL_STREAM`` to the log file's device and inode, as systemd does
    when stderr is its journal stream.

    ``watchdog_pid_self`` sets ``WATCHDOG_PID`` to the daemon's own PID, as systemd does
    (a shell exports its ``$$`` and execs Python, which keeps that PID).

    ``inherit``: listening sockets passed as systemd's socket activation passes them
    (:data:`SOCKET_ACTIVATION`: descriptors from 3, ``LISTEN_FDS``, ``LISTEN_PID``).
    """
    with tempfile.TemporaryDirectory(prefix="egn-") as directory:
        notify = NotifySocket(os.path.join(directory, "notify"))
        await notify.bind()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NOTIFY_", "WATCHDOG_", "JOURNAL_"))
        }
        env["NOTIFY_SOCKET"] = notify.path
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        log_path = config.parent / "egressd.log"
        with log_path.open("wb") as log_file:
            if journal:
                stat = os.fstat(log_file.fileno())
                env["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"
            argv = [sys.executable, "-m", "egressd", "run", "-c", str(config), *args]
            if open_files is not None:  # util-linux's prlimit execs the daemon: same PID
                argv = ["prlimit", f"--nofile={open_files}:{open_files}", "--", *argv]
            if inherit:
                fds = [str(sock.fileno()) for sock in inherit]
                argv = [sys.executable, "-c", SOCKET_ACTIVATION, *fds, "--", *argv]
            if watchdog_pid_self:
                argv = [
                    "/bin/sh",
                    "-c",
                    'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"',
                    "sh",
                    *argv,
                ]
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                cwd=REPO,
                env=env,
                start_new_session=True,
                pass_fds=[sock.fileno() for sock in inherit],
            )
        process = DaemonProcess(popen, config, log_path, notify)
        try:
            await _wait_ready(process, ready_timeout)
            yield process
        except BaseException:
            print(f"egressd (pid {process.pid}) log:\n{process.log()}")  # shown on failure
            raise
        finally:
            await _stop(process)
            notify.close()


SOCKET_ACTIVATION = """
import fcntl, os, sys
split = sys.argv.index("--")
given = [int(fd) for fd in sys.argv[1:split]]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in given]  # out of the way of 3, 4...
for fd in given:
    os.close(fd)
for number, fd in enumerate(high):
    os.dup2(fd, 3 + number)
    os.close(fd)
os.environ["LISTEN_FDS"] = str(len(high))
os.environ["LISTEN_PID"] = str(os.getpid())  # exec keeps the PID, as systemd's fork does
os.execv(sys.argv[split + 1], sys.argv[split + 1:])
"""
"""A launcher that does what systemd does for a socket-activated service: the sockets at
descriptors 3, 4..., ``LISTEN_FDS`` and ``LISTEN_PID`` set, then exec."""


async def _wait_ready(process: DaemonProcess, timeout: float) -> None:
    with trio.move_on_after(timeout) as scope, trio.CancelScope() as watch:
        async with trio.open_nursery() as nursery:

            async def watch_exit() -> None:
                await process.wait_exit()
                watch.cancel()

            nursery.start_soon(watch_exit)
            await process.notify.wait_for("READY=1")
            nursery.cancel_scope.cancel()
    if scope.cancelled_caught or watch.cancelled_caught:
        state = "exited" if not process.running() else f"not ready within {timeout:g}s"
        pytest.fail(f"egressd {state}; its log:\n{process.log()}")


async def _stop(process: DaemonProcess) -> None:
    if process.running():
        process.send(signal.SIGTERM)
        with trio.move_on_after(10):
            await process.wait_exit()
    if process.running():
        process.send(signal.SIGKILL)
        await trio.to_thread.run_sync(process.popen.wait)


# --------------------------------------------------------------------------- clients


class SocksRefused(Exception):
    """The SOCKS5 server answered with a failure reply."""

    def __init__(self, reply: int | None, message: str) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass
class SocksConnection:
    stream: trio.SocketStream
    bound: tuple[str, int] | None
    received: bytearray

    async def receive_until(self, marker: bytes) -> bytes:
        """Read until ``marker`` has been received (counting bytes already received)."""
        while marker not in self.received:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(f"EOF before {marker!r}; got {bytes(self.received)!r}")
            self.received += chunk
        return bytes(self.received)

    async def finish(self) -> bytes:
        """Half-close, read to EOF, close; everything received."""
        await self.stream.send_eof()
        while chunk := await self.stream.receive_some(65536):
            self.received += chunk
        await self.stream.aclose()
        return bytes(self.received)


async def socks_connect(
    port: int, host: str, dest_port: int, *, local_address: str | None = None
) -> SocksConnection:
    """CONNECT through the SOCKS5 door on 127.0.0.1:``port`` (no authentication).

    ``local_address``: the loopback address the client connects from.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=local_address)
    client = socks5.Socks5Handshake(host, dest_port)
    try:
        await stream.send_all(client.initial_bytes())
        while not client.done:
            reply = client.receive_data(await stream.receive_some(65536))
            if reply:
                await stream.send_all(reply)
    except socks5.HandshakeError as exc:
        await stream.aclose()
        raise SocksRefused(int(exc.reply) if exc.reply is not None else None, str(exc)) from exc
    return SocksConnection(stream, client.bound_address, bytearray(client.trailing))


async def scrape(port: int) -> str:
    """The metrics endpoint's exposition text."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        data = bytearray()
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return body.decode()


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})? (?P<value>\S+)$")


_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def sample(exposition: str, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` whose labels are exactly ``labels``, or None."""
    for line in exposition.splitlines():
        match = _SAMPLE.match(line)
        if (
            match
            and match["name"] == name
            and dict(_LABEL.findall(match["labels"] or "")) == labels
        ):
            return float(match["value"])
    return None
