"""Real servers for tests: loopback sinks, and HAProxy / Dante started in the foreground.

Theory of operation
-------------------
Integration tests use real sockets on loopback (127.0.0.0/8 and ::1) and the real Debian
daemons, never mocks. Every daemon runs in the foreground from a temporary directory
(:func:`start_process`), is waited for until its port listens, and is stopped by its PID
(and its own process group) at teardown, whatever happened. A missing binary FAILS the
test with a message naming ``scripts/test``, which installs everything; nothing is skipped.

Network rule: tests connect only to loopback addresses. Any 127.0.0.0/8 address can be
bound as a source here without configuration; 203.0.113.7 may only be used as a source that
is *expected* to fail at bind (EADDRNOTAVAIL), before any packet is sent.

Helpers (import them with ``from harness import ...``; fixtures are in ``conftest.py``):

* :func:`free_port` - a TCP port nobody listens on right now.
* :func:`receive_exactly`, :func:`receive_until`, :func:`read_to_eof`,
  :func:`read_until_closed` - reading a stream.
* :func:`start_sink` / :class:`Sink` - a trio TCP server recording each connection's peer
  and local address, sending a banner and echoing what it receives.
* :func:`start_process` - run a daemon, wait until it listens, dump its output on failure.
* :func:`haproxy_transparent` - HAProxy accepting PROXY v2 and connecting from the header's
  source address to the header's destination (``usesrc clientip``).
* :func:`dante` - Dante with ``external:`` fixed, with or without RFC 1929 authentication.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

import pytest
import trio

REPO = Path(__file__).resolve().parent.parent
INSTALL_HINT = (
    "scripts/test installs it (apt-get install haproxy dante-server dnsmasq swaks socat curl"
    " postfix iproute2 redis-server unbound nsd ldnsutils)"
)
DEFAULT_BANNER = b"220 sink.test ESMTP\r\n"
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


# --------------------------------------------------------------------------- basics


def require_binary(name: str) -> str:
    """The path of ``name`` (sbin dirs included); FAIL the test when it is not installed."""
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))
    if path is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}", pytrace=False)
    return path


#: Every port :func:`free_port` has handed out in this process: never handed out twice.
_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the kernel's pick for port 0), and
    that this process was never given before: two calls in one test's setup (a door and
    the metrics endpoint) must not get the same port, which the kernel's pick allows once
    the first probe is closed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port: int = probe.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def is_listening(port: int) -> bool:
    """True when some TCP socket on this host listens on ``port`` (read from /proc/net).

    Checking the kernel's table instead of connecting keeps daemons' logs free of probes
    (and HAProxy's accept-proxy frontends free of header errors).
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as handle:
            next(handle, None)
            for line in handle:
                fields = line.split()
                local, state = fields[1], fields[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


# --------------------------------------------------------------------------- sink


@dataclass
class SinkConnection:
    """One connection a :class:`Sink` accepted."""

    peer: tuple[str, int]
    local: tuple[str, int]
    received: bytearray = field(default_factory=bytearray)
    closed: trio.Event = field(default_factory=trio.Event)


@dataclass
class Sink:
    """A loopback TCP server standing in for a destination (an MX, say)."""

    host: str
    port: int
    banner: bytes
    echo: bool
    connections: list[SinkConnection] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def peers(self) -> list[str]:
        """The peer IP address of each connection, in arrival order."""
        return [c.peer[0] for c in self.connections]

    async def wait_for_connections(self, count: int = 1) -> list[SinkConnection]:
        """Wait until ``count`` connections arrived (wrap in ``trio.fail_after``)."""
        while len(self.connections) < count:
            await self._changed.wait()
        return self.connections[:count]

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()
        local = stream.socket.getsockname()
        connection = SinkConnection(peer=(peer[0], peer[1]), local=(local[0], local[1]))
        self.connections.append(connection)
        self._changed.set()
        self._changed = trio.Event()
        try:
            if self.banner:
                await stream.send_all(self.banner)
            while data := await stream.receive_some(65536):
                connection.received += data
                if self.echo:
                    await stream.send_all(data)
        except trio.BrokenResourceError:
            pass
        finally:
            connection.closed.set()
            await stream.aclose()


async def start_sink(
    nursery: trio.Nursery,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    banner: bytes = DEFAULT_BANNER,
    echo: bool = True,
) -> Sink:
    """Listen on ``host:port`` (0: any free port) until ``nursery`` is cancelled."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = listeners[0].socket.getsockname()[1]
    sink = Sink(host=host, port=bound_port, banner=banner, echo=echo)
    nursery.start_soon(trio.serve_listeners, sink._handle, listeners)
    return sink


async def receive_exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    """Exactly ``count`` bytes (fails the test on EOF first); for scripted test servers."""
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            pytest.fail(f"EOF after {len(data)} of {count} bytes: {bytes(data)!r}")
        data += chunk
    return bytes(data)


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until EOF; a reset raises trio.BrokenResourceError (cause: the OSError)."""
    data = bytearray()
    while chunk := await stream.receive_some(1 << 20):
        data += chunk
    return bytes(data)


async def read_until_closed(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything until the peer closed, by EOF or by a reset (then: what came before it).

    A server that closes with bytes of ours unread resets the connection; use this where
    only what it said before closing matters, :func:`read_to_eof` where the way it closed
    matters too.
    """
    data = bytearray()
    try:
        while chunk := await stream.receive_some(1 << 20):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return bytes(data)


async def receive_until(stream: trio.abc.ReceiveStream, marker: bytes, start: bytes = b"") -> bytes:
    """Read until ``marker`` has been seen (``start``: bytes already received)."""
    data = bytearray(start)
    while marker not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            pytest.fail(f"EOF before {marker!r}; got {bytes(data)!r}")
        data += chunk
    return bytes(data)


# --------------------------------------------------------------------------- processes


@dataclass
class Process:
    """A daemon started by :func:`start_process`."""

    argv: Sequence[str]
    popen: subprocess.Popen[bytes]
    _output: IO[bytes]
    _mark: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        """Everything the process wrote to stdout and stderr so far."""
        self._output.flush()
        self._output.seek(0)
        return self._output.read().decode("utf-8", errors="replace")

    def describe(self) -> str:
        status = self.popen.poll()
        state = "running" if status is None else f"exited with status {status}"
        return f"{' '.join(self.argv)} (pid {self.pid}, {state}); its output:\n{self.output()}"

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM by PID, SIGKILL after ``grace``; then SIGKILL and reap its whole family.

        The family is every process this daemon started, found in /proc again and again
        until none is left: its process group and session (``start_new_session`` makes
        both IDs its PID), the descendants of every member (a helper that called setsid
        leaves the group but not the tree), and whatever carries the ``_FAMILY_MARK``
        environment variable it was started with (a double-forked daemon is re-parented
        to us and is no one's descendant any more). The test process is a child
        subreaper (:func:`_become_subreaper`), so orphans come back to us and are reaped
        here, not left as zombies under an init that may not reap. A helper that is
        re-parented or forks while we kill is caught by the next pass; one still there
        after ``grace`` fails the test, naming it, instead of being left behind.
        """
        family = _family(self.pid, self._mark)
        if self.popen.poll() is None:
            self.popen.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace)
        left = _kill_family(self.pid, self._mark, family, time.monotonic() + grace)
        self.popen.poll()
        if left:
            raise RuntimeError(f"processes of {' '.join(self.argv)} still exist: {left}")


_FAMILY_MARK = "EGRESSD_TEST_FAMILY"


def _kill_family(leader: int, mark: str, known: set[int], deadline: float) -> dict[int, str]:
    """SIGKILL and reap ``leader``'s family until it is gone; what is left at ``deadline``.

    Gone means a fresh look at /proc finds no member, alive or a zombie: a helper forked
    after one pass's scan is killed by that pass's ``killpg`` but is in no list yet, and
    would stay a zombie if the pass that reaped every listed member ended the loop.
    """
    while True:
        known |= _family(leader, mark, known)
        left = {pid: state for pid in known if (state := _state(pid))}
        if not left or time.monotonic() > deadline:
            return left
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(leader, signal.SIGKILL)
        for pid in sorted(left):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        _reap(set(left))
        time.sleep(0.01)


def _reap(pids: set[int]) -> None:
    """Collect those of ``pids`` that are our exited children (the others: next pass)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def _state(pid: int) -> str:
    """``pid``'s /proc state letter (``Z``: a zombie), or "" when it no longer exists."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _family(leader: int, mark: str, known: Collection[int] = ()) -> set[int]:
    """``leader``'s group and session, descendants of it and of ``known``, and ``mark``'s
    holders, as /proc shows them now (``leader`` itself is waited for by Popen)."""
    parents: dict[int, int] = {}
    family: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == leader:
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError, IndexError, ValueError):
            # pid (comm) state ppid pgrp session ...: comm may hold spaces, so split after ')'.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents[pid] = int(fields[1])
            if leader in (int(fields[2]), int(fields[3])) or _has_mark(entry, mark):
                family.add(pid)
    roots = family | set(known) | {leader}
    grown = True
    while grown:
        grown = False
        for pid, parent in parents.items():
            if parent in roots and pid not in roots:
                roots.add(pid)
                grown = True
    return (roots | family) - {leader}


def _has_mark(entry: Path, mark: str) -> bool:
    with contextlib.suppress(OSError):
        return f"{_FAMILY_MARK}={mark}".encode() in (entry / "environ").read_bytes().split(b"\0")
    return False


def _become_subreaper() -> None:
    """Adopt orphaned descendants (PR_SET_CHILD_SUBREAPER) so their zombies can be reaped."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


ReadyCheck = int | tuple[str, int] | Callable[[], bool] | None


@contextlib.contextmanager
def start_process(
    argv: Sequence[str],
    ready_check: ReadyCheck,
    *,
    timeout: float = 10.0,
    cwd: str | Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[Process]:
    """Run ``argv`` in the foreground; yield once ``ready_check`` passes; always stop it.

    ``ready_check`` is a port (or ``(host, port)``) that must be listening, a callable that
    returns True when ready, or None (no wait). The process runs in its own session so
    that teardown can also reap its children; output goes to a temporary file that is
    shown in the failure message when the process exits early or never gets ready. This
    is synchronous: use it from sync fixtures, or before a test starts its trio tasks.
    """
    require_binary(argv[0])
    _become_subreaper()
    check: Callable[[], bool]
    if ready_check is None:
        check = lambda: True  # noqa: E731
    elif callable(ready_check):
        check = ready_check
    else:
        port = ready_check if isinstance(ready_check, int) else ready_check[1]
        check = lambda: is_listening(port)  # noqa: E731
    with tempfile.TemporaryFile() as output:
        mark = secrets.token_hex(8)
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**(os.environ if env is None else env), _FAMILY_MARK: mark},
            start_new_session=True,
        )
        process = Process(argv=argv, popen=popen, _output=output, _mark=mark)
        try:
            deadline = time.monotonic() + timeout
            while not check():
                if popen.poll() is not None:
                    pytest.fail(f"process exited before it was ready: {process.describe()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"process not ready within {timeout:g}s: {process.describe()}")
                time.sleep(0.02)
            yield process
        finally:
            process.stop()


# --------------------------------------------------------------------------- HAProxy


@dataclass(frozen=True)
class HAProxy:
    """A running transparent HAProxy: send PROXY v2 to ``host:port``."""

    host: str
    port: int
    process: Process

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


HAPROXY_TRANSPARENT_CONFIG = """\
global
    log stderr format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend fe
    bind {host}:{port} accept-proxy
    default_backend be

backend be
    source 0.0.0.0 usesrc clientip
    server transparent 0.0.0.0:0
"""


@contextlib.contextmanager
def haproxy_transparent(
    frontend_port: int | None = None, host: str = "127.0.0.1"
) -> Iterator[HAProxy]:
    """HAProxy 2.6 in transparent mode (as in wire-notes.md), stopped on exit.

    It accepts a PROXY header on ``host:frontend_port`` and connects from the header's
    source address (port chosen by the kernel) to the header's destination and port.
    Needs root (``usesrc clientip`` uses IP_TRANSPARENT).
    """
    port = frontend_port if frontend_port is not None else free_port(host)
    binary = require_binary("haproxy")
    with tempfile.TemporaryDirectory(prefix="egressd-haproxy-") as workdir:
        config = Path(workdir) / "haproxy.cfg"
        config.write_text(HAPROXY_TRANSPARENT_CONFIG.format(host=host, port=port))
        with start_process([binary, "-f", str(config), "-db"], port, cwd=workdir) as process:
            yield HAProxy(host=host, port=port, process=process)


# --------------------------------------------------------------------------- Dante

DANTE_USERNAME = "egressd-test"
DANTE_PASSWORD = "egressd-test-password"
# openssl passwd -6 -salt egressdtestsalt egressd-test-password
_DANTE_PASSWORD_HASH = (
    "$6$egressdtestsalt$x78RelkMbBF3qZHcW2qBCL7D6AERRBDyyUuin5n..CTuV0/T/VW049xHQRisaAXm40GJ"
    "/E5pEvMwRwfTPvBmO/"
)
_DANTE_UID = 64999


@dataclass(frozen=True)
class Dante:
    """A running Dante SOCKS5 server on ``host:port`` connecting out from ``external``."""

    host: str
    port: int
    external: str
    username: str | None
    password: str | None
    process: Process

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"


DANTE_CONFIG = """\
logoutput: stderr
internal: {host} port = {port}
external: {external}
socksmethod: {method}
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    log: error
}}
socks pass {{
    from: 127.0.0.0/8 to: {allow_to}
    command: connect
    log: connect error
}}
socks block {{
    from: 0.0.0.0/0 to: 0.0.0.0/0
    log: connect error
}}
"""


@contextlib.contextmanager
def dante(
    port: int | None = None,
    external: str = "127.0.0.3",
    auth: bool = False,
    *,
    host: str = "127.0.0.1",
    allow_to: str = "127.0.0.0/8",
) -> Iterator[Dante]:
    """Dante 1.4 (``danted -N 1``) with ``external:`` fixed, stopped on exit.

    Its rules pass CONNECT to ``allow_to`` only (loopback by default) and block everything
    else with reply 02. With ``auth``, ``socksmethod: username``: Dante checks the RFC 1929
    credentials against the system password database (getpwnam/getspnam + crypt), so the
    test user :data:`DANTE_USERNAME` / :data:`DANTE_PASSWORD` is added to private copies of
    /etc/passwd and /etc/shadow bind-mounted in a mount namespace of Dante's own
    (``unshare --mount``): the host's user database is never touched. Where mount
    namespaces are not allowed, the user is created with useradd and removed on exit.
    """
    port = port if port is not None else free_port(host)
    binary = require_binary("danted")
    with tempfile.TemporaryDirectory(prefix="egressd-dante-") as workdir:
        config = Path(workdir) / "danted.conf"
        config.write_text(
            DANTE_CONFIG.format(
                host=host,
                port=port,
                external=external,
                method="username" if auth else "none",
                allow_to=allow_to,
            )
        )
        argv = [binary, "-f", str(config), "-N", "1"]
        with contextlib.ExitStack() as stack:
            if auth:
                argv = stack.enter_context(_with_test_user(Path(workdir), argv))
            process = stack.enter_context(start_process(argv, port, cwd=workdir))
            yield Dante(
                host=host,
                port=port,
                external=external,
                username=DANTE_USERNAME if auth else None,
                password=DANTE_PASSWORD if auth else None,
                process=process,
            )


def _mount_namespaces_work() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run(
        [unshare, "--mount", "true"], capture_output=True, stdin=subprocess.DEVNULL, check=False
    )
    return probe.returncode == 0


@contextlib.contextmanager
def _with_test_user(workdir: Path, argv: list[str]) -> Iterator[list[str]]:
    """``argv`` wrapped so that the Dante test user exists for it; see :func:`dante`."""
    if _mount_namespaces_work():
        passwd = workdir / "passwd"
        shadow = workdir / "shadow"
        passwd.write_text(
            _without_user(Path("/etc/passwd").read_text())
            + f"{DANTE_USERNAME}:x:{_DANTE_UID}:65534::/nonexistent:/usr/sbin/nologin\n"
        )
        shadow.write_text(
            _without_user(Path("/etc/shadow").read_text())
            + f"{DANTE_USERNAME}:{_DANTE_PASSWORD_HASH}:19000:0:99999:7:::\n"
        )
        shadow.chmod(0o640)
        # unshare and sh exec in turn, so the daemon keeps the PID start_process saw.
        script = (
            'mount --bind "$1" /etc/passwd && mount --bind "$2" /etc/shadow && shift 2 && exec "$@"'
        )
        wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
        yield [*wrapper, str(passwd), str(shadow), *argv]
        return
    useradd, userdel, chpasswd = (require_binary(n) for n in ("useradd", "userdel", "chpasswd"))
    subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", DANTE_USERNAME],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            [chpasswd, "-e"],
            input=f"{DANTE_USERNAME}:{_DANTE_PASSWORD_HASH}\n".encode(),
            check=True,
            capture_output=True,
        )
        yield argv
    finally:
        subprocess.run([userdel, DANTE_USERNAME], check=False, capture_output=True)


def _without_user(table: str) -> str:
    lines = [line for line in table.splitlines() if not line.startswith(f"{DANTE_USERNAME}:")]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- names


_AddrInfo = (
    tuple[Literal[socket.AddressFamily.AF_INET], socket.SocketKind, int, str, tuple[str, int]]
    | tuple[
        Literal[socket.AddressFamily.AF_INET6],
        socket.SocketKind,
        int,
        str,
        tuple[str, int, int, int] | tuple[int, bytes],
    ]
)


class StaticResolver(trio.abc.HostnameResolver):
    """Answers ``trio.socket.getaddrinfo`` from a dict, so tests resolve names offline.

    Install it in a test with ``trio.socket.set_custom_hostname_resolver(StaticResolver(
    {"mx.test": ["127.0.0.9", "127.0.0.1"]}))`` (it lasts for that test's trio run). Names
    not in the dict fail with EAI_NONAME, as a name that does not exist would; IP literals
    never reach a custom resolver.
    """

    def __init__(self, names: dict[str, list[str]]) -> None:
        self.names = {name.lower().rstrip("."): list(addrs) for name, addrs in names.items()}
        self.queries: list[str] = []

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[_AddrInfo]:
        name = (host or b"").decode("ascii").lower().rstrip(".")
        self.queries.append(name)
        await trio.lowlevel.checkpoint()
        if name not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        number = int(port) if port is not None else 0
        result: list[_AddrInfo] = []
        for address in self.names[name]:
            if ":" in address and family in (0, socket.AF_INET6):
                result.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (address, number, 0, 0)))
            elif ":" not in address and family in (0, socket.AF_INET):
                result.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, number)))
        if not result:
            raise socket.gaierror(
                socket.EAI_ADDRFAMILY, "Address family for hostname not supported"
            )
        return result

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
