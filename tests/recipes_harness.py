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
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

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
