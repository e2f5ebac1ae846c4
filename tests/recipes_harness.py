"""MTAs that cannot be installed next to Postfix, run from private directories for the
README's recipes (tests/integration/test_recipes_*.py).

Theory of operation
-------------------
Installing Exim or OpenSMTPD as Debian packages would remove Postfix (each is "the" MTA),
so ``scripts/test`` downloads their .debs once (``apt-get download``) and unpacks them with
``dpkg -x`` under :data:`RECIPES_CACHE`, one directory per MTA, and installs Haraka from
npm into the same cache. The tests never touch the network: a missing cache FAILS the test
with the hint to run ``scripts/test``, nothing is skipped.

The cache is world-readable (``/var/cache/egressd-recipes`` unless
``$EGRESSD_RECIPES_CACHE`` says otherwise) because the MTAs drop root privileges and
re-execute themselves from there.

* :func:`exim` - Exim 4 from ``exim4-daemon-light``, with a private configuration, spool
  and log. :meth:`Exim.submit` runs ``exim -odf``: the message is delivered (or deferred)
  before the call returns, so no daemon or queue runner is needed.
* :func:`opensmtpd` - OpenSMTPD's ``smtpd -d`` (foreground) with a private configuration.
  Its spool (``/var/spool/smtpd``) and control socket (``/run/smtpd.sock``) are compiled
  in, so it runs in a mount namespace of its own (``unshare --mount``) where a private
  directory is bind-mounted over each; the mount points exist on the host (scripts/test
  makes them, as the package would). Messages are submitted over SMTP.
* :func:`haraka` - Haraka from npm (``haraka -i`` makes its directory, the recipe's files
  replace the defaults), run with ``haraka -c DIR`` by the system's Node.js; single
  process (``nodes=0``), listening on 127.0.0.1. :meth:`Haraka.submit` returns the reply
  to the end of DATA, which ``queue/smtp_forward`` gives only after the forward did.
* :func:`kumod_socks5_connect` - KumoMTA cannot run here; this is kumod's SOCKS5 client
  byte for byte (crates/kumod/src/egress_source.rs, ``ProxyProto::perform_handshake``,
  KumoMTA 3ebc1e85, socksv5 0.3.1), with its reading of every failure
  (:class:`KumodProxyBindError`, :class:`KumodHandshakeError`, and :func:`kumod_health_event`
  for ``maybe_record_health_failure``), and :func:`smtp_transaction`, the SMTP that
  kumod then speaks through the tunnel.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import pwd
import re
import shutil
import smtplib
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from harness import Process, free_port, require_binary, start_process

RECIPES_CACHE = Path(os.environ.get("EGRESSD_RECIPES_CACHE", "/var/cache/egressd-recipes"))
HINT = "scripts/test (as root) downloads and unpacks it"


def unpacked(name: str, binary: str) -> Path:
    """The directory ``dpkg -x`` unpacked ``name`` into; FAIL when ``binary`` is not there."""
    root = RECIPES_CACHE / name
    if not (root / binary).is_file():
        pytest.fail(f"{root / binary} is missing: {HINT}", pytrace=False)
    return root


def require_user(name: str) -> pwd.struct_passwd:
    """The system user an MTA was built to drop privileges to; FAIL when it does not exist."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pytest.fail(f"user {name} does not exist: {HINT} and creates it", pytrace=False)


@contextlib.contextmanager
def private_directory(
    prefix: str, owner: pwd.struct_passwd, *subdirectories: str
) -> Iterator[Path]:
    """A temporary directory readable by everyone, its ``subdirectories`` owned by ``owner``
    (pytest's tmp_path is private to root; the MTAs drop to their own users)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as name:
        directory = Path(name)
        directory.chmod(0o755)
        for sub in subdirectories:
            (directory / sub).mkdir()
            shutil.chown(directory / sub, user=owner.pw_uid, group=owner.pw_gid)
        yield directory


# --------------------------------------------------------------------------- Exim

EXIM_USER = "Debian-exim"  # compiled into Debian's exim4

# The part of the configuration that only makes a private instance; the recipe follows it.
EXIM_PRIVATE = """\
exim_path = {binary}
primary_hostname = exim.test
qualify_domain = exim.test
spool_directory = {dir}/spool
log_file_path = {dir}/log/%slog
pid_file_path = {dir}/exim.pid
keep_environment =
log_selector = +proxy
"""


@dataclass
class Exim:
    """A private Exim: its binary, and the directory with its configuration, spool and log."""

    binary: Path
    directory: Path

    @property
    def config(self) -> Path:
        return self.directory / "exim.conf"

    def run(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [str(self.binary), "-C", str(self.config), *args],
            input=stdin,
            capture_output=True,
            check=False,
            timeout=60,
        )

    def submit(self, sender: str, recipients: Sequence[str], message: bytes) -> None:
        """``exim -odf -f sender -- recipients``: accept, then attempt delivery at once
        (returns once delivered or deferred; run it in a thread from trio)."""
        result = self.run("-odf", "-oi", "-f", sender, "--", *recipients, stdin=message)
        if result.returncode != 0:
            pytest.fail(
                f"exim failed ({result.returncode}): {result.stderr.decode()}\n{self.log()}"
            )

    def log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.directory / "log" / "mainlog").read_text(errors="replace")
        return ""

    def deliveries(self) -> list[str]:
        """The main log's delivery lines: ``=>`` delivered, ``==`` deferred, ``**`` bounced."""
        return re.findall(r"^.* (?:=>|==|\*\*) .*$", self.log(), re.MULTILINE)

    def queued(self) -> int:
        """How many messages wait in the spool (``exim -bpc``)."""
        return int(self.run("-bpc").stdout.decode().strip() or 0)


@contextlib.contextmanager
def exim(recipe: str, files: dict[str, str] | None = None) -> Iterator[Exim]:
    """Exim 4 with a private spool and log, configured with ``recipe`` (routers, transports,
    authenticators, retry rules) after :data:`EXIM_PRIVATE`. ``files`` are written into its
    directory first; ``{dir}`` in the recipe names that directory."""
    root = unpacked("exim4", "usr/sbin/exim4")
    user = require_user(EXIM_USER)
    with private_directory("egressd-exim-", user, "spool", "log") as directory:
        for name, text in (files or {}).items():
            (directory / name).write_text(text)
        binary = root / "usr/sbin/exim4"
        text = EXIM_PRIVATE.format(binary=binary, dir=directory) + recipe.replace(
            "{dir}", str(directory)
        )
        (directory / "exim.conf").write_text(text)
        yield Exim(binary, directory)


# --------------------------------------------------------------------------- OpenSMTPD

OPENSMTPD_USERS = ("opensmtpd", "opensmtpq")  # compiled into Debian's smtpd
OPENSMTPD_MOUNT_POINTS = ("/var/spool/smtpd", "/var/lib/opensmtpd/empty")
_IN_PRIVATE_MOUNTS = (
    'mount --bind "$1" /var/spool/smtpd && mount --bind "$2" /run && shift 2 && exec "$@"'
)


@dataclass
class OpenSmtpd:
    """A running private OpenSMTPD listening for submissions on 127.0.0.1:``port``."""

    directory: Path
    port: int
    process: Process

    def submit(self, sender: str, recipients: Sequence[str], message: bytes) -> None:
        """Hand a message over by SMTP (OpenSMTPD queues it, then relays it; run it in a
        thread from trio)."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.sendmail(sender, list(recipients), message)

    def log(self) -> str:
        return self.process.output()

    def deliveries(self) -> list[str]:
        """Its ``mta delivery`` log lines, each with ``result=`` and the relay's ``stat=``."""
        return re.findall(r"^.* mta delivery .*$", self.log(), re.MULTILINE)

    def queued(self) -> int:
        """Envelopes in its queue: ``queue/<bucket>/<message id>/<envelope id>`` in the
        spool, next to each message's ``message`` file."""
        queue = self.directory / "spool" / "queue"
        return sum(1 for path in queue.glob("*/*/*") if path.name != "message")


@contextlib.contextmanager
def opensmtpd(config: str, files: dict[str, str] | None = None) -> Iterator[OpenSmtpd]:
    """OpenSMTPD with ``config`` as smtpd.conf, submissions on 127.0.0.1:``{port}`` (put
    ``listen on 127.0.0.1 port {port}`` in it) and ``{dir}`` its directory, where ``files``
    are written (mode 0640: smtpd refuses tables others can read)."""
    root = unpacked("opensmtpd", "usr/sbin/smtpd")
    for name in OPENSMTPD_USERS:
        require_user(name)
    for mount_point in OPENSMTPD_MOUNT_POINTS:
        if not Path(mount_point).is_dir():
            pytest.fail(f"{mount_point} is missing: {HINT} and creates it", pytrace=False)
    with private_directory("egressd-opensmtpd-", pwd.getpwnam("root"), "spool", "run") as directory:
        (directory / "spool").chmod(0o711)
        for name, text in (files or {}).items():
            (directory / name).write_text(text)
            (directory / name).chmod(0o640)
        port = free_port()
        (directory / "smtpd.conf").write_text(
            config.replace("{dir}", str(directory)).replace("{port}", str(port))
        )
        argv = [
            require_binary("unshare"),
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            _IN_PRIVATE_MOUNTS,
            "sh",
            str(directory / "spool"),
            str(directory / "run"),
            str(root / "usr/sbin/smtpd"),
            "-d",
            "-v",
            "-f",
            str(directory / "smtpd.conf"),
        ]
        with start_process(argv, port) as process:
            yield OpenSmtpd(directory, port, process)


# --------------------------------------------------------------------------- Haraka


@dataclass
class Haraka:
    """A running Haraka listening on 127.0.0.1:``port``."""

    directory: Path
    port: int
    process: Process

    def submit(self, sender: str, recipients: Sequence[str], message: bytes) -> tuple[int, str]:
        """One SMTP transaction; the reply to the end of DATA (run it in a thread from trio)."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.ehlo("submitter.test")
            client.mail(sender)
            for recipient in recipients:
                code, text = client.rcpt(recipient)
                if code >= 400:
                    return code, text.decode()
            code, text = client.data(message)
            return code, text.decode()

    def log(self) -> str:
        return self.process.output()


@contextlib.contextmanager
def haraka(files: dict[str, str]) -> Iterator[Haraka]:
    """Haraka with ``files`` (name -> text) in its config directory over ``haraka -i``'s,
    and ``smtp.ini`` listening on a free port of 127.0.0.1 in one process."""
    root = unpacked("haraka", "node_modules/Haraka/bin/haraka")
    node = require_binary("node")
    binary = str(root / "node_modules/Haraka/bin/haraka")
    with tempfile.TemporaryDirectory(prefix="egressd-haraka-") as name:
        directory = Path(name) / "haraka"
        subprocess.run([node, binary, "-i", str(directory)], capture_output=True, check=True)
        port = free_port()
        smtp_ini = f"listen=127.0.0.1:{port}\nnodes=0\ndaemonize=false\n"
        for file, text in {"smtp.ini": smtp_ini, **files}.items():
            (directory / "config" / file).write_text(text)
        with start_process([node, binary, "-c", str(directory)], port, timeout=20) as process:
            yield Haraka(directory, port, process)


# --------------------------------------------------------------------------- kumod's wire

NOAUTH, USERNAME_PASSWORD, NO_ACCEPTABLE_METHOD = 0x00, 0x02, 0xFF
CONNECT, BIND = 0x01, 0x02


class KumodHandshakeError(Exception):
    """An ``anyhow`` error of the handshake (method, login, or CONNECT): kumod records no
    source health event for it; a failed CONNECT is a failure of that destination address."""


class KumodProxyBindError(Exception):
    """kumod's ``ProxyBindError``: the proxy answered the BIND with a failure. kumod
    records ``HealthEvent::ProxyUnhealthy`` for the source (``suspend_when_proxy_unhealthy``)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"The proxy server failed to bind: status {status:#04x}")
        self.status = status


def kumod_health_event(error: Exception) -> str | None:
    """``EgressSource::maybe_record_health_failure`` for an error of the SOCKS5 handshake."""
    return "ProxyUnhealthy" if isinstance(error, KumodProxyBindError) else None


@dataclass
class KumodTunnel:
    """A tunnel as kumod has it after ``connect_to``: the stream, and the source address it
    logs (``MaybeProxiedSourceAddress``: the CONNECT reply's BND.ADDR and port)."""

    stream: trio.SocketStream
    source_address: tuple[str, int]
    offered_methods: bytes
    chosen_method: int


def socks_host(address: str, port: int) -> bytes:
    """socksv5's ``write_request`` host: ATYP 01/04 with the IP literal, then the port."""
    ip = ipaddress.ip_address(address)
    atyp = b"\x01" if ip.version == 4 else b"\x04"
    return atyp + ip.packed + struct.pack(">H", port)


async def read_request_status(stream: trio.abc.ReceiveStream) -> tuple[int, tuple[str, int] | None]:
    """socksv5's ``read_request_status``: VER 5, a status RFC 1928 defines (00-08), RSV,
    an IPv4, domain or IPv6 host, the port. The host, None for a domain (kumod's
    ``socks_response_addr`` refuses one after a CONNECT)."""
    head = await _exactly(stream, 4)
    if head[0] != 5:
        raise KumodHandshakeError(f"invalid SOCKS version {head[0]:02X}, expected 05")
    if head[1] > 8:
        raise KumodHandshakeError(f"invalid request: invalid status {head[1]:02X}")
    if head[3] == 3:
        await _exactly(stream, (await _exactly(stream, 1))[0] + 2)
        return head[1], None
    length = {1: 4, 4: 16}.get(head[3])
    if length is None:
        raise KumodHandshakeError(f"invalid request: invalid address type {head[3]:02X}")
    raw = await _exactly(stream, length + 2)
    host = str(ipaddress.ip_address(raw[:length]))
    return head[1], (host, struct.unpack(">H", raw[length:])[0])


async def _exactly(stream: trio.abc.ReceiveStream, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = await stream.receive_some(count - len(data))
        if not chunk:
            raise KumodHandshakeError(f"EOF after {len(data)} of {count} bytes")
        data += chunk
    return bytes(data)


async def kumod_socks5_connect(
    proxy: tuple[str, int],
    source: str,
    destination: tuple[str, int],
    credentials: tuple[str, str] | None = None,
) -> KumodTunnel:
    """What kumod does for a source with ``socks5_proxy_server = proxy``,
    ``socks5_proxy_source_address = source`` (and ``socks5_proxy_username`` /
    ``socks5_proxy_password = credentials``) to reach ``destination``, an MX address it
    resolved itself: offer NOAUTH (and USERNAME/PASSWORD with credentials), log in if
    asked, ``BIND source:0``, read its status only, ``CONNECT destination``, and take the
    reply's BND.ADDR as the source address. Each step waits for the previous reply."""
    stream = await trio.open_tcp_stream(*proxy)
    try:
        methods = bytes([NOAUTH, USERNAME_PASSWORD] if credentials else [NOAUTH])
        await stream.send_all(bytes([5, len(methods)]) + methods)
        version, method = await _exactly(stream, 2)
        if version != 5:
            raise KumodHandshakeError(f"invalid SOCKS version {version}")
        if method == USERNAME_PASSWORD:
            if credentials is None:
                raise KumodHandshakeError(
                    "server responded with UsernamePassword method when we didn't ask for it"
                )
            user, password = (part.encode() for part in credentials)
            await stream.send_all(bytes([1, len(user)]) + user + bytes([len(password)]) + password)
            if await _exactly(stream, 1) != b"\x01":
                raise KumodHandshakeError("invalid SOCKS5 UsernamePassword response packet")
            if await _exactly(stream, 1) != b"\x00":
                raise KumodHandshakeError("SOCKS5 username/password was incorrect")
        elif method != NOAUTH:
            raise KumodHandshakeError(f"incompatible SOCKS5 authentication {method:#04x}")
        await stream.send_all(bytes([5, BIND, 0]) + socks_host(source, 0))
        status, _ = await read_request_status(stream)
        if status != 0:
            raise KumodProxyBindError(status)
        await stream.send_all(bytes([5, CONNECT, 0]) + socks_host(*destination))
        status, bound = await read_request_status(stream)
        if status != 0:
            raise KumodHandshakeError(
                f"failed to connect {source} -> {destination}: status {status:#04x}"
            )
        if bound is None:
            raise KumodHandshakeError("Domain not supported")
    except BaseException:
        await stream.aclose()
        raise
    return KumodTunnel(stream, bound, methods, method)


async def smtp_transaction(
    stream: trio.SocketStream, ehlo: str, sender: str, recipient: str, body: bytes
) -> list[str]:
    """One SMTP transaction and QUIT over ``stream``, one command at a time (kumod's EHLO
    name is its source's ``ehlo_domain``); every reply, each as its last line."""
    buffer = bytearray()

    async def reply() -> str:
        while True:
            while b"\r\n" not in buffer:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise EOFError(f"EOF waiting for a reply; got {bytes(buffer)!r}")
                buffer.extend(chunk)
            end = buffer.index(b"\r\n")
            line = buffer[:end].decode()
            del buffer[: end + 2]
            if line[3:4] != "-":
                return line

    replies = [await reply()]
    for command in (f"EHLO {ehlo}", f"MAIL FROM:<{sender}>", f"RCPT TO:<{recipient}>", "DATA"):
        await stream.send_all(command.encode() + b"\r\n")
        replies.append(await reply())
    for data in (body + b"\r\n.\r\n", b"QUIT\r\n"):
        await stream.send_all(data)
        replies.append(await reply())
    await stream.aclose()
    return replies
