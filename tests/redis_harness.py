"""A real redis-server for tests: Debian's binary, in the foreground, on loopback.

Theory of operation
-------------------
:class:`RedisServer` writes a ``redis.conf`` into a private temporary directory and runs
``redis-server redis.conf`` in a session of its own, bound to 127.0.0.1 on a free port,
with no persistence (``save ""``, ``appendonly no``): a kill loses everything, as a test
of an outage expects. It is stopped by its PID, never by name.

What a test can do with it:

- :meth:`RedisServer.kill` sends SIGKILL (an outage); :meth:`RedisServer.start` starts it
  again on the SAME port (and the same password, users and certificates), so a client
  configured with :attr:`RedisServer.url` reconnects to it;
- ``password="..."`` sets ``requirepass`` (the ``default`` user's password);
  ``users={"name": "password"}`` adds ACL users with every right (``~* &* +@all``);
- ``tls=True`` serves TLS only (``tls-port``, ``port 0``) with a certificate for
  127.0.0.1 from a trustme CA; :attr:`RedisServer.ca_file` is that CA's PEM for the
  client's CA file, and :attr:`RedisServer.url` starts with ``rediss://``.

Fixtures (tests/conftest.py): ``redis_server`` (a plain one) and ``redis_factory``
(``redis_factory(password=..., users=..., tls=...)`` for the rest); both stop every
server they started when the test ends. Everything here is synchronous and takes a few
tens of milliseconds, so it may be called from a trio test between awaits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from urllib.parse import quote

import trustme
from harness import free_port, is_listening, require_binary

__all__ = ["RedisServer", "redis_servers"]

START_TIMEOUT = 10.0


class RedisServer:
    """One redis-server on 127.0.0.1:``port`` with its directory; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        *,
        password: str | None = None,
        users: Mapping[str, str] | None = None,
        tls: bool = False,
    ) -> None:
        self.directory = directory
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.password = password
        self.users = dict(users or {})
        self.tls = tls
        self.ca_file: Path | None = None
        """The CA's PEM (``tls=True``): what the client must trust."""
        self.process: subprocess.Popen[bytes] | None = None
        self._log = directory / "redis.log"
        if tls:
            self._make_certificates()
        (directory / "redis.conf").write_text(self._config())

    # ------------------------------------------------------------------ what a client needs

    @property
    def url(self) -> str:
        """``redis://`` (or ``rediss://``) for this server, without credentials."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}"

    def url_with(self, username: str | None = None, password: str | None = None) -> str:
        """:attr:`url` with ``username:password@`` (either may be None), URL-quoted."""
        scheme, _, rest = self.url.partition("://")
        user = quote(username or "", safe="")
        secret = f":{quote(password, safe='')}" if password is not None else ""
        at = "@" if user or secret else ""
        return f"{scheme}://{user}{secret}{at}{rest}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("redis-server is not running")
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """What redis-server wrote so far (its log file)."""
        with contextlib.suppress(FileNotFoundError):
            return self._log.read_text(errors="replace")
        return ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> RedisServer:
        """Start (or start again, on the same port) and wait until it listens."""
        if self.running():
            raise RuntimeError(f"redis-server already runs as pid {self.pid}")
        binary = require_binary("redis-server")
        self.process = subprocess.Popen(
            [binary, str(self.directory / "redis.conf")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not is_listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on {self.port}:\n{self.log()}")
            time.sleep(0.01)
        return self

    def kill(self) -> None:
        """SIGKILL by PID (an outage: nothing is saved), and reap it."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it is still there after 5 s; reaped."""
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(5.0)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    # ------------------------------------------------------------------ configuration

    def _config(self) -> str:
        lines = [
            f"bind {self.host}",
            "protected-mode no",
            f'dir "{self.directory}"',
            f'logfile "{self._log}"',
            "daemonize no",
            'save ""',
            "appendonly no",
            "databases 1",
        ]
        if self.tls:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f'tls-cert-file "{self.directory / "server.pem"}"',
                f'tls-key-file "{self.directory / "server.key"}"',
                f'tls-ca-cert-file "{self.ca_file}"',
                "tls-auth-clients no",
            ]
        else:
            lines.append(f"port {self.port}")
        if self.password is not None:
            lines.append(f"requirepass {self.password}")
        for name, secret in self.users.items():
            lines.append(f"user {name} on >{secret} ~* &* +@all")
        return "\n".join(lines) + "\n"

    def _make_certificates(self) -> None:
        ca = trustme.CA()
        leaf = ca.issue_cert(self.host, "localhost")
        self.ca_file = self.directory / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        leaf.private_key_pem.write_to_path(str(self.directory / "server.key"))
        leaf.cert_chain_pems[0].write_to_path(str(self.directory / "server.pem"))


@contextlib.contextmanager
def redis_servers() -> Iterator[list[RedisServer]]:
    """Collects the servers a test starts; stops every one (by PID) and removes its
    directory at exit. ``redis_factory`` in conftest.py is built on this."""
    started: list[RedisServer] = []
    try:
        yield started
    finally:
        for server in started:
            server.stop()
            shutil.rmtree(server.directory, ignore_errors=True)


def new_server(
    started: list[RedisServer],
    *,
    password: str | None = None,
    users: Mapping[str, str] | None = None,
    tls: bool = False,
) -> RedisServer:
    """A started :class:`RedisServer` in a fresh private directory, recorded in ``started``."""
    directory = Path(tempfile.mkdtemp(prefix="egressd-redis-"))
    os.chmod(directory, 0o700)
    server = RedisServer(directory, password=password, users=users, tls=tls)
    started.append(server)
    return server.start()
