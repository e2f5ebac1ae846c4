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
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import smtplib
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
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
