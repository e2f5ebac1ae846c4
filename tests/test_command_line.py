"""The command line in process: parsing, exit codes, check's output, warnings and verbs.

``check``'s EHLO warnings ask a real dnsmasq on loopback; ``suspend`` and ``resume`` talk
to an in-process daemon over its real control socket.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme
from smtp_harness import dnsmasq

from egressd.cli import EXIT_CONFIG, build_parser, main
from egressd.config import load_config
from egressd.daemon import Daemon, serve

Capture = pytest.CaptureFixture[str]


def write(directory: Path, text: str, name: str = "egressd.toml") -> str:
    path = directory / name
    path.write_text(text)
    return str(path)


def run(capsys: Capture, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: usage errors, --help
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


VALID = '[source.a]\nsource_address = "127.0.0.2"\n[pool.p.a]\n'
INVALID = '[source.a]\nsource_address = "10.0.0.300"\n'


# --------------------------------------------------------------------------- parsing


def test_config_option_works_before_and_after_the_command(tmp_path: Path, capsys: Capture) -> None:
    path = write(tmp_path, VALID)
    before = run(capsys, "-c", path, "check")
    after = run(capsys, "check", "-c", path)
    assert before[0] == after[0] == 0
    assert before[1] == after[1]
    assert f"configuration {path} is valid" in before[1]
    other = write(tmp_path, INVALID, "other.toml")
    assert run(capsys, "-c", other, "check", "--config", path)[0] == 0  # the later one wins


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_command_has_a_description_argument_help_and_exit_codes(capsys: Capture) -> None:
    commands = subcommands(build_parser())
    assert set(commands) == {
        "check",
        "explain",
        "select",
        "probe",
        "run",
        "status",
        "suspend",
        "resume",
        "warmup",
        "socks5",
    }
    for name, command in commands.items():
        assert command.description, name
        undocumented = [
            action.dest
            for action in command._actions
            if not action.help and not isinstance(action, argparse._HelpAction)
        ]
        assert undocumented == [], name
        code, out, _ = run(capsys, name, "--help")
        assert code == 0
        assert "exit status: 0 " in out and "2 usage error" in out, name
    assert "78" in run(capsys, "run", "--help")[1]
    assert "before or after" in run(capsys, "--help")[1]


def test_usage_errors_exit_2(tmp_path: Path, capsys: Capture) -> None:
    path = write(tmp_path, VALID)
    assert run(capsys, "check", "-c", path, "--bogus")[0] == 2
    assert run(capsys)[0] == 2
    assert run(capsys, "select", "-c", path, "nope")[0] == 2
    code, _, err = run(capsys, "suspend", "-c", path, "a", "ten minutes please")
    assert code == 2 and "DURATION" in err


# --------------------------------------------------------------------------- check


def test_check_exit_codes_and_quiet(tmp_path: Path, capsys: Capture) -> None:
    # Valid, with a warning (203.0.113.7 is not on this host): -q prints nothing.
    warned = write(tmp_path, '[source.a]\nsource_address = "203.0.113.7"\n')
    assert run(capsys, "check", "-q", "-c", warned) == (0, "", "")
    code, out, err = run(capsys, "check", "-c", warned)
    assert code == 0 and "is valid" in out
    assert "source_address 203.0.113.7 is not an address of this host" in err
    invalid = write(tmp_path, INVALID, "bad.toml")
    code, out, err = run(capsys, "check", "-q", "-c", invalid)
    assert (code, out) == (1, "")
    assert f'{invalid}: source "a": source_address: "10.0.0.300" is not an IP address' in err


def test_run_exits_78_on_an_invalid_configuration(tmp_path: Path, capsys: Capture) -> None:
    code, _, err = run(capsys, "run", "-c", write(tmp_path, INVALID))
    assert code == EXIT_CONFIG == 78
    assert "1 error(s)" in err


def test_check_effective_prints_every_setting_and_differing_defaults(
    tmp_path: Path, capsys: Capture
) -> None:
    path = write(
        tmp_path,
        VALID
        + '[source.s]\nsocks5_proxy_server = "127.0.0.1:1080"\n'
        + 'socks5_proxy_username = "u"\nsocks5_proxy_password = { key_data = "hunter2" }\n'
        + '[limits]\nmax_connections = 500\n[auth.users]\np = "sesame"\n',
    )
    code, out, _ = run(capsys, "check", "--effective", "-c", path)
    assert code == 0
    lines = out.splitlines()
    assert "limits.max_connections = 500  # default: 10000" in lines
    assert "limits.max_connections_per_source = 2000" in lines
    assert "dial.timeout = 30" in lines
    assert 'source.a.source_address = "127.0.0.2"  # default: (unset)' in lines
    assert 'smtp.tls.mode = "opportunistic"' in lines
    assert "hunter2" not in out and "sesame" not in out
    assert 'source.s.socks5_proxy_password = "***"  # default: (unset)' in lines


def test_check_names_the_source_that_wins_a_shared_address(tmp_path: Path, capsys: Capture) -> None:
    path = write(
        tmp_path,
        '[source.first]\nsource_address = "127.0.0.2"\n'
        '[source.other]\nsource_address = "127.0.0.3"\n'
        '[source.second]\nha_proxy_server = "127.0.0.1:9"\nha_proxy_source_address = "127.0.0.2"\n',
    )
    code, _, err = run(capsys, "check", "-c", path)
    assert code == 0
    assert (
        'sources "first", "second" share the address 127.0.0.2: a SOCKS5 BIND to it and a '
        'PROXY header from it always mean "first"'
    ) in err
    assert "127.0.0.3" not in err


def test_check_warns_about_ehlo_names_without_fcrdns(tmp_path: Path, capsys: Capture) -> None:
    hosts = {"good.test": ["127.0.0.2"], "wrong.test": ["127.0.0.9"]}
    with dnsmasq(hosts=hosts) as dns:
        path = write(
            tmp_path,
            f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
            '[source.good]\nsource_address = "127.0.0.2"\nehlo_domain = "good.test"\n'
            '[source.wrong]\nsource_address = "127.0.0.2"\nehlo_domain = "wrong.test"\n'
            '[source.missing]\nsource_address = "127.0.0.3"\nehlo_domain = "missing.test"\n',
        )
        code, _, err = run(capsys, "check", "-c", path)
    assert code == 0
    ehlo = [line for line in err.splitlines() if "ehlo_domain" in line]
    assert ehlo == [
        'egressd: warning: source "wrong": ehlo_domain wrong.test resolves to 127.0.0.9, '
        "not to 127.0.0.2; the source's address needs FCrDNS",
        'egressd: warning: source "missing": ehlo_domain missing.test has no A record; it '
        "should resolve to 127.0.0.3 (FCrDNS)",
    ]


def test_check_skips_ehlo_names_when_dns_does_not_answer(tmp_path: Path, capsys: Capture) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as quiet:  # bound, never answers
        quiet.bind(("127.0.0.1", 0))
        port = quiet.getsockname()[1]
        path = write(
            tmp_path,
            f'[dns]\nnameservers = ["127.0.0.1:{port}"]\ntimeout = "1s"\n'
            '[source.a]\nsource_address = "127.0.0.2"\nehlo_domain = "a.test"\n'
            '[source.b]\nsource_address = "127.0.0.3"\nehlo_domain = "b.test"\n',
        )
        code, _, err = run(capsys, "check", "-c", path)
    assert code == 0
    assert err.count("EHLO names not checked: DNS did not answer") == 1
    assert "a.test" not in err and "b.test" not in err


# --------------------------------------------------------------------------- suspend, resume


@asynccontextmanager
async def daemon_on(path: str) -> AsyncIterator[Daemon]:
    async with trio.open_nursery() as nursery:
        daemon: Daemon = await nursery.start(partial(serve, load_config(path), doors={}))
        try:
            yield daemon
        finally:
            nursery.cancel_scope.cancel()


async def run_async(capsys: Capture, *argv: str) -> tuple[int, str, str]:
    return await trio.to_thread.run_sync(partial(run, capsys, *argv))


async def test_suspend_and_resume_over_the_control_socket(short_dir: Path, capsys: Capture) -> None:
    path = write(short_dir, VALID + f'[control]\nsocket = "{short_dir}/c.sock"\n')
    async with daemon_on(path) as daemon:
        health = daemon.runtime.health
        code, out, _ = await run_async(
            capsys, "suspend", "-c", path, "a", "10m", "--reason", "listed at Spamhaus"
        )
        assert code == 0 and out.startswith("a suspended for 600s, until ")
        (status,) = health.snapshot()
        assert status.suspended and status.suspension_reason == "listed at Spamhaus"
        assert 599 < (status.suspended_for or 0) <= 600
        code, table, _ = await run_async(capsys, "status", "-c", path)
        row = next(line for line in table.splitlines() if line.startswith("a "))
        assert row.split()[1] == "suspended"
        assert row.endswith("operator: listed at Spamhaus")
        assert await run_async(capsys, "resume", "a", "-c", path) == (0, "a resumed\n", "")
        assert not health.is_suspended("a")
        assert await run_async(capsys, "resume", "-c", path, "a") == (
            0,
            "a was not suspended\n",
            "",
        )
        code, out, err = await run_async(capsys, "suspend", "-c", path, "ghost", "1h")
        assert (code, out) == (1, "")
        assert "the daemon refused: unknown source 'ghost'" in err


async def test_suspend_needs_a_control_socket_and_a_running_daemon(
    short_dir: Path, capsys: Capture
) -> None:
    bare = write(short_dir, VALID, "bare.toml")
    code, _, err = run(capsys, "suspend", "-c", bare, "a", "1h")
    assert code == 1 and "[control] socket is not set" in err
    stopped = write(short_dir, VALID + f'[control]\nsocket = "{short_dir}/none.sock"\n')
    code, _, err = run(capsys, "resume", "-c", stopped, "a")
    assert code == 1 and "cannot reach egressd" in err


def test_check_fails_on_a_certificate_and_key_that_do_not_match(
    tmp_path: Path, capsys: Capture
) -> None:
    ca = trustme.CA()
    one, other = ca.issue_cert("one.test"), ca.issue_cert("other.test")
    one.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    tls = f'[smtp.tls]\ncertificate = "{tmp_path}/cert.pem"\nprivate_key = "{tmp_path}/key.pem"\n'
    path = write(tmp_path, VALID + tls)
    code, out, err = run(capsys, "check", "-q", "-c", path)
    assert (code, out) == (1, "")
    assert f"{path}: smtp.tls.certificate: cannot load certificate {tmp_path}/cert.pem" in err
    one.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    assert run(capsys, "check", "-q", "-c", path) == (0, "", "")
    (tmp_path / "key.pem").unlink()
    code, _, err = run(capsys, "check", "-q", "-c", path)
    assert code == 1 and "No such file or directory" in err


def test_run_refuses_to_start_with_a_certificate_check_refuses(
    tmp_path: Path, capsys: Capture
) -> None:
    """Exit 78 (no restart loop) with the file and key path, instead of starting and
    answering 454 to every STARTTLS."""
    ca = trustme.CA()
    one, other = ca.issue_cert("one.test"), ca.issue_cert("other.test")
    one.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    tls = f'[smtp.tls]\ncertificate = "{tmp_path}/cert.pem"\nprivate_key = "{tmp_path}/key.pem"\n'
    path = write(tmp_path, VALID + tls)
    code, out, err = run(capsys, "run", "-c", path)
    assert (code, out) == (EXIT_CONFIG, "")
    assert f"{path}: smtp.tls.certificate: cannot load certificate {tmp_path}/cert.pem" in err
    assert "1 error(s) in the configuration" in err
