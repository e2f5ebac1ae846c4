"""The egressd command line, run as a real process: check, select, probe on every path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio
from harness import Dante, HAProxy, Sink

REPO = Path(__file__).resolve().parents[2]


def egressd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "egressd", *args], capture_output=True, text=True, timeout=60
    )


async def egressd_async(*args: str) -> subprocess.CompletedProcess[str]:
    result: subprocess.CompletedProcess[bytes] = await trio.run_process(
        [sys.executable, "-m", "egressd", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "egressd.toml"
    path.write_text(text)
    return str(path)


def test_check_prints_sources_pool_shares_and_listeners() -> None:
    result = egressd("check", "-c", str(REPO / "config" / "egressd.toml"))
    assert result.returncode == 0, result.stderr
    assert "lo-2: via direct, bind 127.0.0.2, ehlo mta2.localhost" in result.stdout
    assert "66.67%" in result.stdout and "33.33%" in result.stdout
    assert "socks5 127.0.0.1:1080 pool default" in result.stdout
    assert "smtp   127.0.0.1:2525 pool default" in result.stdout


def test_check_on_kumomta_file_and_environment_variable(tmp_path: Path) -> None:
    env_result = subprocess.run(
        [sys.executable, "-m", "egressd", "check"],
        capture_output=True,
        text=True,
        env={"EGRESSD_CONFIG": str(REPO / "config" / "sources.toml"), "PATH": "/usr/bin:/bin"},
    )
    assert env_result.returncode == 0, env_result.stderr
    assert "pool-2:" in env_result.stdout


def test_check_invalid_exits_1_with_every_error_on_stderr(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, '[source.a]\nsource_address = "10.0.0.300"\n[pool.p.b]\n[pool.p.a]\nweight = -2\n'
    )
    result = egressd("check", "-c", path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert f'{path}: source "a": source_address: "10.0.0.300" is not an IP address' in result.stderr
    assert f'{path}: pool "p": source "b": names a source that is not defined' in result.stderr
    assert f'{path}: pool "p": source "a": weight: -2 is outside' in result.stderr


def test_select_prints_the_smooth_sequence(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, "[source.a]\n[source.b]\n[pool.p.a]\nweight = 2\n[pool.p.b]\nweight = 1\n"
    )
    result = egressd("select", "-c", path, "p", "-n", "6")
    assert result.returncode == 0
    assert result.stdout.split() == ["a", "b", "a", "a", "b", "a"]
    empty = egressd("select", "-c", write_config(tmp_path, "[pool.none]\n"), "none")
    assert empty.returncode != 0
    assert "no sources available in pool none" in empty.stderr


async def test_probe_direct_from_each_source_of_a_pool(tmp_path: Path, sink: Sink) -> None:
    path = write_config(
        tmp_path,
        '[source.two]\nsource_address = "127.0.0.2"\n[source.three]\nsource_address = "127.0.0.3"\n'
        "[pool.p.two]\n[pool.p.three]\n",
    )
    result = await egressd_async(
        "probe",
        "-c",
        path,
        "--ignore-access",
        "--source",
        "three",
        f"127.0.0.1:{sink.port}",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["source"] == "three"
    assert report["via"] == "direct"
    assert report["local_address"].startswith("127.0.0.3:")
    assert report["remote_address"] == f"127.0.0.1:{sink.port}"
    assert report["greeting"] == "220 sink.test ESMTP"
    assert sink.peers == ["127.0.0.3"]
    text = await egressd_async(
        "probe", "-c", path, "--ignore-access", "--pool", "p", f"127.0.0.1:{sink.port}"
    )
    assert text.returncode == 0, text.stderr
    assert "source          two" in text.stdout
    assert sink.peers == ["127.0.0.3", "127.0.0.2"]


async def test_probe_ipv6_and_remote_port(tmp_path: Path, sink6: Sink) -> None:
    path = write_config(
        tmp_path, f'[source.v6]\nsource_address = "::1"\nremote_port = {sink6.port}\n'
    )
    result = await egressd_async(
        "probe", "-c", path, "--ignore-access", "--source", "v6", "[::1]:25", "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["remote_address"] == f"[::1]:{sink6.port}"
    assert report["local_address"].startswith("[::1]:")


async def test_probe_through_haproxy(tmp_path: Path, sink: Sink, haproxy: HAProxy) -> None:
    path = write_config(
        tmp_path,
        f'[source.hp]\nha_proxy_server = "{haproxy.endpoint}"\n'
        'ha_proxy_source_address = "127.0.0.5"\n',
    )
    result = await egressd_async(
        "probe", "-c", path, "--ignore-access", "--source", "hp", f"127.0.0.1:{sink.port}", "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["via"], report["greeting"]) == ("haproxy", "220 sink.test ESMTP")
    assert report["local_address"] == "127.0.0.5:0"
    assert sink.peers == ["127.0.0.5"]


async def test_probe_through_dante(tmp_path: Path, sink: Sink, dante_auth: Dante) -> None:
    path = write_config(
        tmp_path,
        f'[source.d]\nsocks5_proxy_server = "{dante_auth.endpoint}"\n'
        "egressd_socks5_plain_connect = true\n"
        f'socks5_proxy_username = "{dante_auth.username}"\n'
        f'socks5_proxy_password = {{ key_data = "{dante_auth.password}" }}\n',
    )
    result = await egressd_async(
        "probe", "-c", path, "--ignore-access", "--source", "d", f"127.0.0.1:{sink.port}", "--json"
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["via"] == "socks5"
    assert report["local_address"].startswith("127.0.0.3:")
    assert sink.peers == ["127.0.0.3"]


async def test_probe_failures_exit_nonzero_with_typed_reason(tmp_path: Path, sink: Sink) -> None:
    path = write_config(
        tmp_path,
        '[source.ghost]\nsource_address = "203.0.113.7"\n'
        '[source.hop]\nha_proxy_server = "127.0.0.1:1"\nha_proxy_source_address = "127.0.0.5"\n',
    )
    ghost = await egressd_async(
        "probe",
        "-c",
        path,
        "--ignore-access",
        "--source",
        "ghost",
        f"127.0.0.1:{sink.port}",
        "--json",
    )
    assert ghost.returncode == 1
    assert json.loads(ghost.stdout)["kind"] == "unplumbed"
    assert "203.0.113.7" in ghost.stderr
    hop = await egressd_async(
        "probe", "-c", path, "--ignore-access", "--source", "hop", f"127.0.0.1:{sink.port}"
    )
    assert hop.returncode == 1
    assert "hop" in hop.stderr
    assert sink.connections == []
    unknown = await egressd_async(
        "probe", "-c", path, "--ignore-access", "--source", "nope", "127.0.0.1:25"
    )
    assert unknown.returncode == 2
    assert 'unknown source "nope"' in unknown.stderr
