"""Real SMTP and DNS servers for the SMTP front door's tests, all on loopback.

Theory of operation
-------------------
* :func:`smtp_sink` - an aiosmtpd server (in a thread of the test process) standing in for
  a recipient domain's MX. It records every accepted message with the peer address it came
  from, the EHLO name, the TLS version, the envelope (with MAIL/RCPT parameters), the
  body and its arrival time. Recipients can be told to answer with a fixed reply
  (``rcpt_replies``), and STARTTLS is offered when a trustme certificate is given.
* :class:`ScriptedMx` - a small trio SMTP server whose reply at every step (banner, EHLO,
  STARTTLS, MAIL, RCPT, DATA, final dot) can be scripted: a reply, ``DROP`` (close the
  connection there) or ``HANG`` (never answer). It records every command line and body
  octet, and whether a final dot arrived. The reject/drop matrix uses it.
* :func:`dnsmasq` - dnsmasq in the foreground answering MX, A, AAAA and raw (null MX)
  records for ``*.test``; any other name under ``.test`` is NXDOMAIN, and names outside it
  are REFUSED (which a resolver reports like SERVFAIL).
* :func:`postfix` - a private Postfix (own config, queue and log directory in tmp) with
  ``relayhost`` pointing at egressd, run with ``postfix start-fg`` and stopped by PID.

Every process is stopped by its PID (see ``harness.start_process``); a missing binary fails
the test with the hint to run ``scripts/test``.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import smtplib
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from aiosmtpd.controller import Controller
from harness import Process, free_port, require_binary, start_process

# --------------------------------------------------------------------------- aiosmtpd sink


@dataclass(frozen=True)
class SinkMessage:
    """One message an :func:`smtp_sink` accepted."""

    peer: str
    ehlo: str
    tls_version: str | None
    mail_from: str
    mail_options: tuple[str, ...]
    rcpt_tos: tuple[str, ...]
    rcpt_options: tuple[tuple[str, ...], ...]
    body: bytes
    arrived: float = 0.0
    """``time.monotonic()`` when the sink accepted the message (its final dot)."""


@dataclass
class SmtpSink:
    """A running aiosmtpd sink; ``messages`` fills as messages arrive (thread-safe appends)."""

    host: str
    port: int
    messages: list[SinkMessage] = field(default_factory=list)
    connections: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_sync(self, count: int, timeout: float = 10.0) -> list[SinkMessage]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                pytest.fail(f"sink got {len(self.messages)} messages, expected {count}")
            time.sleep(0.02)
        return list(self.messages)

    async def wait(self, count: int, timeout: float = 10.0) -> list[SinkMessage]:
        with trio.move_on_after(timeout):
            while len(self.messages) < count:
                await trio.sleep(0.01)
        if len(self.messages) < count:
            pytest.fail(f"sink got {len(self.messages)} messages, expected {count}")
        return list(self.messages)


class _SinkHandler:
    def __init__(self, sink: SmtpSink, rcpt_replies: Mapping[str, str]) -> None:
        self.sink = sink
        self.rcpt_replies = {k.lower(): v for k, v in rcpt_replies.items()}

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        with self.sink._lock:
            self.sink.connections.append(f"{session.peer[0]} EHLO {hostname}")
        return responses

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        reply = self.rcpt_replies.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(tuple(options))
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        tls: str | None = None
        if session.ssl is not None:
            cipher = session.ssl.get("cipher")
            tls = str(cipher[1]) if cipher else "TLS"
        message = SinkMessage(
            peer=str(session.peer[0]),
            ehlo=str(session.host_name),
            tls_version=tls,
            mail_from=str(envelope.mail_from),
            mail_options=tuple(envelope.mail_options),
            rcpt_tos=tuple(envelope.rcpt_tos),
            rcpt_options=tuple(tuple(o) for o in envelope.rcpt_options),
            body=bytes(envelope.original_content or b""),
            arrived=time.monotonic(),
        )
        with self.sink._lock:
            self.sink.messages.append(message)
        return f"250 2.0.0 sink queued message {len(self.sink.messages)}"


@contextlib.contextmanager
def smtp_sink(
    host: str = "127.0.0.1",
    port: int | None = None,
    *,
    tls_context: ssl.SSLContext | None = None,
    rcpt_replies: Mapping[str, str] | None = None,
) -> Iterator[SmtpSink]:
    """An aiosmtpd sink on ``host:port`` (a free port by default), stopped on exit.

    It advertises SIZE, 8BITMIME and SMTPUTF8, and STARTTLS when ``tls_context`` is given.
    ``rcpt_replies`` maps recipient addresses to the reply their RCPT gets.
    """
    port = port if port is not None else free_port(host)
    sink = SmtpSink(host, port)
    controller = Controller(
        _SinkHandler(sink, rcpt_replies or {}),
        hostname=host,
        port=port,
        server_hostname="sink.test",
        tls_context=tls_context,
        require_starttls=False,
        enable_SMTPUTF8=True,
        data_size_limit=64 * 1024 * 1024,
    )
    controller.start()
    try:
        sink.connections.clear()  # the controller's own start-up probe
        yield sink
    finally:
        controller.stop()


def server_tls_context(cert: Any) -> ssl.SSLContext:
    """A server context for a trustme ``LeafCert``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


# --------------------------------------------------------------------------- scripted MX

DROP = "DROP"
HANG = "HANG"
GARBAGE = "GARBAGE"  # for "starttls": say 220, then send bytes that are not TLS and close


@dataclass
class ScriptedSession:
    peer: str
    commands: list[str] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    got_final_dot: bool = False
    closed: trio.Event = field(default_factory=trio.Event)


@dataclass
class ScriptedMx:
    """A trio SMTP server whose replies are scripted per step; see the module doc.

    ``replies`` keys: ``banner``, ``ehlo``, ``starttls``, ``mail``, ``rcpt``, ``data``,
    ``dot``, ``rset``, and ``rcpt:<address>`` for one recipient; ``after_dot: DROP`` closes
    the connection right after the reply to the final dot. Values are reply text
    (``"550 5.1.1 no"``; a multi-line reply uses ``\\n`` between lines), or DROP / HANG.
    """

    host: str
    port: int
    replies: dict[str, str]
    extensions: tuple[str, ...]
    sessions: list[ScriptedSession] = field(default_factory=list)

    def commands(self) -> list[str]:
        return [c for s in self.sessions for c in s.commands]

    async def wait_closed(self, count: int = 1, timeout: float = 5.0) -> None:
        with trio.fail_after(timeout):
            while len(self.sessions) < count:
                await trio.sleep(0.01)
            for session in self.sessions[:count]:
                await session.closed.wait()

    async def handle(self, stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()[0]
        session = ScriptedSession(peer=str(peer))
        self.sessions.append(session)
        try:
            await self._converse(stream, session)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            session.closed.set()
            await stream.aclose()

    async def _say(self, stream: trio.SocketStream, step: str, default: str) -> bool:
        """Send the scripted reply of ``step``; False when the script says to drop."""
        reply = self.replies.get(step, default)
        if reply == DROP:
            return False
        if reply == HANG:
            await trio.sleep_forever()
        code = reply[:3]
        lines = reply[4:].split("\n")
        wire = "".join(
            f"{code}{'-' if i < len(lines) - 1 else ' '}{line}\r\n" for i, line in enumerate(lines)
        )
        await stream.send_all(wire.encode())
        return True

    async def _converse(self, stream: trio.SocketStream, session: ScriptedSession) -> None:
        buffer = bytearray()

        async def line() -> str | None:
            while b"\r\n" not in buffer:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return None
                buffer.extend(chunk)
            end = buffer.index(b"\r\n")
            text = buffer[:end].decode("utf-8", "surrogateescape")
            del buffer[: end + 2]
            session.commands.append(text)
            return text

        if not await self._say(stream, "banner", "220 scripted.test ESMTP"):
            return
        while True:
            command = await line()
            if command is None:
                return
            verb = command.split(" ", 1)[0].upper()
            if verb == "EHLO":
                ehlo = "\n".join(("scripted.test", *self.extensions))
                if not await self._say(stream, "ehlo", f"250 {ehlo}"):
                    return
            elif verb == "STARTTLS":
                if self.replies.get("starttls") == GARBAGE:
                    await stream.send_all(b"220 2.0.0 go ahead\r\n")
                    await stream.send_all(b"this is not a TLS server hello\r\n" * 4)
                    return
                if not await self._say(stream, "starttls", "454 4.7.0 TLS not available"):
                    return
            elif verb == "MAIL":
                if not await self._say(stream, "mail", "250 2.1.0 sender ok"):
                    return
            elif verb == "RCPT":
                address = command.partition("<")[2].partition(">")[0].lower()
                step = f"rcpt:{address}" if f"rcpt:{address}" in self.replies else "rcpt"
                if not await self._say(stream, step, "250 2.1.5 recipient ok"):
                    return
            elif verb == "DATA":
                if not await self._say(stream, "data", "354 go ahead"):
                    return
                if self.replies.get("data", "354")[:3] != "354":
                    continue
                while True:
                    end = buffer.find(b"\r\n.\r\n")
                    if end >= 0 or buffer.startswith(b".\r\n"):
                        cut = 0 if buffer.startswith(b".\r\n") else end + 2
                        session.body.extend(buffer[:cut])
                        del buffer[: cut + 3]
                        session.got_final_dot = True
                        break
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        session.body.extend(buffer)
                        return
                    buffer.extend(chunk)
                if not await self._say(stream, "dot", "250 2.0.0 scripted queued"):
                    return
                if self.replies.get("after_dot") == DROP:
                    return
            elif verb == "RSET":
                if not await self._say(stream, "rset", "250 2.0.0 reset"):
                    return
            elif verb == "QUIT":
                await self._say(stream, "quit", "221 2.0.0 bye")
                return
            else:
                await self._say(stream, "other", "250 2.0.0 ok")


async def start_scripted_mx(
    nursery: trio.Nursery,
    replies: Mapping[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    extensions: Sequence[str] = ("PIPELINING", "SIZE 1000000", "8BITMIME", "ENHANCEDSTATUSCODES"),
) -> ScriptedMx:
    """Start a :class:`ScriptedMx` on ``host`` in ``nursery``; it lives until the test ends."""
    mx = ScriptedMx(host, port, dict(replies or {}), tuple(extensions))
    listeners = await nursery.start(partial(trio.serve_tcp, mx.handle, port, host=host))
    mx.port = listeners[0].socket.getsockname()[1]
    return mx


# --------------------------------------------------------------------------- dnsmasq


@dataclass(frozen=True)
class Dnsmasq:
    host: str
    port: int
    process: Process

    @property
    def nameserver(self) -> str:
        return f"{self.host}:{self.port}"


@contextlib.contextmanager
def dnsmasq(
    *,
    mx: Sequence[tuple[str, str, int]] = (),
    hosts: Mapping[str, Sequence[str]] | None = None,
    null_mx: Sequence[str] = (),
    txt: Mapping[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    extra: Sequence[str] = (),
) -> Iterator[Dnsmasq]:
    """dnsmasq serving ``mx`` ((domain, exchange, preference)), ``hosts`` (name -> addresses),
    ``txt`` (name -> one TXT string) and RFC 7505 null MX records for ``null_mx``; every
    other ``*.test`` name is NXDOMAIN. ``port`` restarts one on a known port; ``extra``
    adds options (``--local-ttl=300``: answers a resolver may cache)."""
    port = port if port is not None else free_port(host)
    binary = require_binary("dnsmasq")
    argv = [
        binary,
        "--keep-in-foreground",
        "--no-daemon",
        f"--port={port}",
        f"--listen-address={host}",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--no-negcache",
        "--cache-size=0",
        "--local=/test/",
        "--pid-file=",
        "--log-facility=-",
    ]
    argv += [f"--mx-host={domain},{exchange},{pref}" for domain, exchange, pref in mx]
    argv += [f"--host-record={name},{','.join(addrs)}" for name, addrs in (hosts or {}).items()]
    argv += [f"--dns-rr={domain},15,000000" for domain in null_mx]  # MX "0 ."
    argv += [f"--txt-record={name},{text}" for name, text in (txt or {}).items()]
    argv += list(extra)
    with start_process(argv, port) as process:
        yield Dnsmasq(host, port, process)


# --------------------------------------------------------------------------- Postfix

POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.test
mydomain = postfix.test
myorigin = postfix.test
mydestination =
inet_interfaces = loopback-only
inet_protocols = ipv4
relayhost = [127.0.0.1]:{relay_port}
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
smtp_tls_security_level = none
smtp_connect_timeout = 5s
alias_maps =
alias_database =
local_recipient_maps =
biff = no
{extra}
"""

POSTFIX_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
postlog   unix-dgram n  -       n       -       1       postlogd
"""


@dataclass
class Postfix:
    """A private Postfix instance relaying everything to ``relayhost``."""

    directory: Path
    process: Process | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "maillog"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def sendmail(self, sender: str, recipients: Sequence[str], message: bytes) -> None:
        """Submit with ``sendmail -C DIR -f sender -- recipients`` (an empty sender is <>)."""
        binary = require_binary("sendmail")
        result = subprocess.run(
            [binary, "-C", str(self.directory), "-f", sender or "<>", "--", *recipients],
            input=message,
            capture_output=True,
            check=False,
            timeout=30,
        )
        if result.returncode != 0:
            pytest.fail(f"sendmail failed ({result.returncode}): {result.stderr.decode()}")

    def flush(self) -> None:
        """``postqueue -f``: attempt every deferred message now."""
        binary = require_binary("postqueue")
        subprocess.run(
            [binary, "-c", str(self.directory), "-f"], capture_output=True, check=False, timeout=10
        )

    def clear_queue(self) -> None:
        """``postsuper -d ALL``: forget every queued message (between tests)."""
        binary = require_binary("postsuper")
        subprocess.run(
            [binary, "-c", str(self.directory), "-d", "ALL"],
            capture_output=True,
            check=False,
            timeout=10,
        )

    def queue_ids(self) -> list[str]:
        binary = require_binary("postqueue")
        result = subprocess.run(
            [binary, "-c", str(self.directory), "-j"], capture_output=True, check=False, timeout=10
        )
        return re.findall(r'"queue_id":\s*"([0-9A-F]+)"', result.stdout.decode())

    def wait_for_log(
        self, predicate: Callable[[str], bool] | str, timeout: float = 15.0
    ) -> list[str]:
        """The log lines once one matches ``predicate`` (a regex or a function)."""
        check: Callable[[str], bool]
        if isinstance(predicate, str):
            pattern = re.compile(predicate)
            check = lambda line: pattern.search(line) is not None  # noqa: E731
        else:
            check = predicate
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log().splitlines()
            if any(check(line) for line in lines):
                return lines
            if time.monotonic() > deadline:
                pytest.fail(f"no matching Postfix log line within {timeout:g}s:\n{self.log()}")
            time.sleep(0.05)


@contextlib.contextmanager
def postfix(
    relay_port: int, extra_main_cf: str = "", extra_master_cf: str = ""
) -> Iterator[Postfix]:
    """Postfix 3.x from a private config directory, relaying to 127.0.0.1:``relay_port``.

    The directory is made under the system's temporary directory and opened to the postfix
    user (pytest's own tmp_path is private to root, and Postfix's daemons run as postfix).
    Runs ``postfix -c DIR start-fg`` (the master stays in the foreground), waits for the
    master's "daemon started" log line, and stops it with ``postfix -c DIR stop`` and then
    by PID (and its process group) at exit.
    """
    binary = require_binary("postfix")
    require_binary("sendmail")
    with tempfile.TemporaryDirectory(prefix="egressd-postfix-") as name:
        directory = Path(name)
        directory.chmod(0o755)
        for sub in ("queue", "data"):
            (directory / sub).mkdir()
        shutil.chown(directory / "data", user="postfix")
        (directory / "main.cf").write_text(
            POSTFIX_MAIN_CF.format(dir=directory, relay_port=relay_port, extra=extra_main_cf)
        )
        (directory / "master.cf").write_text(POSTFIX_MASTER_CF + extra_master_cf)
        instance = Postfix(directory)

        def started() -> bool:
            return "daemon started" in instance.log()

        with start_process([binary, "-c", str(directory), "start-fg"], started) as process:
            instance.process = process
            try:
                yield instance
            finally:
                subprocess.run(
                    [binary, "-c", str(directory), "stop"],
                    capture_output=True,
                    check=False,
                    timeout=15,
                )
                instance.process = None


# --------------------------------------------------------------------------- MTA side


def send_one(
    port: int, recipient: str, body: bytes = b"Subject: t\r\n\r\nbody\r\n", *, timeout: float = 15
) -> str:
    """One MTA session through egressd's SMTP door, one message (smtplib, blocking: run it in
    a thread from trio). The outcome as text: ``sent``, the refusing reply as ``code text``,
    or ``failed: ...`` when the session broke without a reply."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=timeout) as client:
            client.sendmail("a@sender.test", [recipient], body)
        return "sent"
    except smtplib.SMTPRecipientsRefused as exc:
        code, text = exc.recipients[recipient]
        return f"{code} {text.decode()}"
    except smtplib.SMTPResponseException as exc:
        error = exc.smtp_error
        return f"{exc.smtp_code} {error.decode() if isinstance(error, bytes) else error}"
    except (smtplib.SMTPException, OSError) as exc:
        return f"failed: {exc}"


async def send_lockstep(relay_port: int, recipient: str, body: bytes) -> str:
    """One message to ``recipient`` through egressd, a command at a time on a trio stream:
    the first reply that is not a success, else the final one (``code text``)."""
    stream = await trio.open_tcp_stream("127.0.0.1", relay_port)
    async with stream:
        buffer = b""

        async def reply() -> str:
            nonlocal buffer
            with trio.fail_after(15):
                while True:
                    while b"\r\n" not in buffer:
                        buffer += await stream.receive_some(65536)
                    line, _, buffer = buffer.partition(b"\r\n")
                    if line[3:4] != b"-":
                        return line.decode()

        await reply()
        commands = ("EHLO mta.test", "MAIL FROM:<a@sender.test>", f"RCPT TO:<{recipient}>", "DATA")
        for command in commands:
            await stream.send_all(command.encode() + b"\r\n")
            answer = await reply()
            if not answer.startswith(("2", "3")):
                return answer
        await stream.send_all(body + b".\r\n")
        return await reply()
