"""scripts/install into a temporary DESTDIR: files land, and an edited config survives a rerun.

The quick tests skip the user and the virtualenv (``EGRESSD_INSTALL_SKIP_USER=1``,
``EGRESSD_INSTALL_SKIP_VENV=1``); one test does the whole pip install (about 15 s here,
from the configured package index) and runs the installed ``egressd --version``.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import egressd

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "scripts" / "install"


def run_install(destdir: Path, **env: str) -> str:
    """Run scripts/install below ``destdir``; its combined output."""
    environ = {
        **os.environ,
        "DESTDIR": str(destdir),
        "EGRESSD_INSTALL_SKIP_USER": "1",
        "EGRESSD_INSTALL_SKIP_VENV": "1",
        "PYTHON": sys.executable,
        **env,
    }
    if "PREFIX" not in env:
        environ.pop("PREFIX", None)
    result = subprocess.run(
        ["bash", str(INSTALL)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_land(tmp_path: Path) -> None:
    output = run_install(tmp_path)
    etc = tmp_path / "etc" / "egressd"
    assert (etc / "egressd.toml").read_bytes() == (ROOT / "config" / "egressd.toml").read_bytes()
    assert (etc / "sources.toml").read_bytes() == (ROOT / "config" / "sources.toml").read_bytes()
    assert mode(etc) == 0o750
    assert mode(etc / "egressd.toml") == 0o640
    unit = tmp_path / "etc" / "systemd" / "system" / "egressd.service"
    assert unit.read_bytes() == (ROOT / "systemd" / "egressd.service").read_bytes()
    assert mode(unit) == 0o644
    link = tmp_path / "usr" / "local" / "bin" / "egressd"
    assert link.is_symlink()
    assert os.readlink(link) == "/opt/egressd/venv/bin/egressd"
    assert "user: skipped" in output
    assert "package: skipped" in output
    assert "systemctl daemon-reload && systemctl enable --now egressd" in output


def test_rerun_keeps_an_edited_config(tmp_path: Path) -> None:
    run_install(tmp_path)
    edited = tmp_path / "etc" / "egressd" / "egressd.toml"
    edited.write_text("# the operator's own configuration\n")
    (tmp_path / "etc" / "egressd" / "sources.toml").unlink()

    output = run_install(tmp_path)

    assert edited.read_text() == "# the operator's own configuration\n"
    assert "config: kept existing /etc/egressd/egressd.toml" in output
    assert "config: installed /etc/egressd/sources.toml" in output
    assert "unit: /etc/systemd/system/egressd.service is up to date" in output


def test_prefix_moves_the_link_and_the_units_exec_start(tmp_path: Path) -> None:
    run_install(tmp_path, PREFIX="/usr")
    assert (tmp_path / "usr" / "bin" / "egressd").is_symlink()
    unit = (tmp_path / "etc" / "systemd" / "system" / "egressd.service").read_text()
    assert "\nExecStart=/usr/bin/egressd run -c /etc/egressd/egressd.toml\n" in unit
    assert "\nExecReload=/usr/bin/egressd check -q -c /etc/egressd/egressd.toml\n" in unit
    assert "\nDocumentation=file:/usr/share/doc/egressd/README.md\n" in unit
    assert (tmp_path / "usr" / "share" / "doc" / "egressd" / "README.md").is_file()
    assert (tmp_path / "usr" / "lib" / "sysusers.d" / "egressd.conf").is_file()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("systemd-tmpfiles") is None,
    reason="needs root and systemd-sysusers / systemd-tmpfiles",
)
def test_destdir_config_is_readable_by_the_egressd_group_once_applied(tmp_path: Path) -> None:
    """A package build (DESTDIR) cannot chown to a group that does not exist yet; the
    sysusers.d and tmpfiles.d snippets it ships do it on the target. Applied here with
    --root, as the target's first boot (or the package's postinst) would."""
    output = run_install(tmp_path)
    assert "systemd-sysusers egressd.conf && systemd-tmpfiles --create egressd.conf" in output
    lib = tmp_path / "usr" / "local" / "lib"
    for tool, kind in (("systemd-sysusers", "sysusers"), ("systemd-tmpfiles", "tmpfiles")):
        extra = ["--create"] if kind == "tmpfiles" else []
        subprocess.run(
            [tool, f"--root={tmp_path}", *extra, str(lib / f"{kind}.d" / "egressd.conf")],
            check=True,
            capture_output=True,
            timeout=60,
        )
    group = next(
        line for line in (tmp_path / "etc" / "group").read_text().splitlines()
        if line.startswith("egressd:")
    )  # fmt: skip
    gid = int(group.split(":")[2])
    etc = tmp_path / "etc" / "egressd"
    for path, wanted in (
        (etc, 0o750),
        (etc / "egressd.toml", 0o640),
        (etc / "sources.toml", 0o640),
    ):
        assert (path.stat().st_uid, path.stat().st_gid, mode(path)) == (0, gid, wanted), path


@pytest.mark.integration
def test_full_install_with_virtualenv(tmp_path: Path) -> None:
    output = run_install(tmp_path, EGRESSD_INSTALL_SKIP_VENV="0")
    venv = tmp_path / "opt" / "egressd" / "venv"
    assert f"installed egressd {egressd.__version__} into" in output
    version = subprocess.run(
        [str(venv / "bin" / "egressd"), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert egressd.__version__ in version.stdout + version.stderr
    # The example configuration and the unit are package data: real files, not links.
    shown = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.resources as r, sys; "
            "d = r.files('egressd') / 'data'; "
            "sys.stdout.write(''.join((d / n).read_text() for n in sys.argv[1:]))",
            "egressd.toml",
            "egressd.service",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    expected = (ROOT / "config" / "egressd.toml").read_text()
    expected += (ROOT / "systemd" / "egressd.service").read_text()
    assert shown == expected
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert not (site / "egressd" / "data" / "egressd.toml").is_symlink()
    assert (site / "egressd" / "py.typed").exists()
    licenses = list(site.glob("egressd-*.dist-info/**/LICENSE"))
    assert licenses and "Apache License" in licenses[0].read_text()
