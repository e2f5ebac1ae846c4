"""``shaping_files`` in the main file: paths, errors, ``check``'s output, the daemon's shaper.

``check`` runs on KumoMTA's own shipped and community shaping files (tests/shaping/fixtures/)
with ``[dns]`` pointing at a dnsmasq on loopback that knows none of their domains, so the
rolled-up domain sections are left out with a warning and nothing leaves the machine.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import trio
from smtp_harness import dnsmasq

from egressd.cli import main
from egressd.config import ConfigError, load_config
from egressd.daemon import serve
from egressd.net.shaping import load_policy
from egressd.shaping import Destination, Lease

FIXTURES = Path(__file__).parent / "shaping" / "fixtures"
SHIPPED = FIXTURES / "kumomta-policy-extras-shaping.toml"
COMMUNITY = FIXTURES / "kumomta-community-shaping.toml"
SOURCES = '[source.a]\nsource_address = "127.0.0.2"\n[pool.p.a]\n'
GOOGLE = Destination("mx.google.test", "gmail.test", ("mx.google.com",))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_shaping_files_are_relative_to_the_main_file(tmp_path: Path) -> None:
    main_file = write(
        tmp_path / "etc" / "egressd.toml",
        'shaping_files = ["shaping/a.toml", "/abs/b.toml"]\n' + SOURCES,
    )
    config = load_config(main_file)
    assert config.shaping_files == (tmp_path / "etc" / "shaping" / "a.toml", Path("/abs/b.toml"))


def test_shaping_files_must_be_a_list_of_names(tmp_path: Path) -> None:
    main_file = write(tmp_path / "egressd.toml", "shaping_files = 3\n" + SOURCES)
    with pytest.raises(ConfigError) as caught:
        load_config(main_file)
    assert [p.key for p in caught.value.problems] == ["shaping_files"]


def test_a_shaping_error_names_the_shaping_file_and_its_key_path(tmp_path: Path) -> None:
    shaping = write(tmp_path / "shaping.toml", '["default"]\nconnection_limit = "lots"\n')
    main_file = write(tmp_path / "egressd.toml", 'shaping_files = ["shaping.toml"]\n' + SOURCES)
    with pytest.raises(ConfigError) as caught:
        load_policy(load_config(main_file))
    [problem] = caught.value.problems
    assert problem.file == str(shaping)
    assert "connection_limit" in problem.key


def test_later_files_layer_over_earlier_ones(tmp_path: Path) -> None:
    write(tmp_path / "a.toml", '["default"]\nconnection_limit = 5\nmax_message_rate = "10/s"\n')
    write(tmp_path / "b.toml", '["default"]\nconnection_limit = 2\n')
    main_file = write(tmp_path / "egressd.toml", 'shaping_files = ["a.toml", "b.toml"]\n' + SOURCES)
    policy = load_policy(load_config(main_file))
    assert policy is not None
    described = {b.label: str(b.value) for b in policy.limits("a", GOOGLE).budgets}
    assert described["connection_limit"] == "2"
    assert described["max_message_rate"] == "10/s"


def test_no_shaping_files_no_policy(tmp_path: Path) -> None:
    assert load_policy(load_config(write(tmp_path / "egressd.toml", SOURCES))) is None


def test_check_names_the_dead_rules_of_kumomtas_own_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with dnsmasq() as dns:
        main_file = write(
            tmp_path / "egressd.toml",
            f'shaping_files = ["{SHIPPED}", "{COMMUNITY}"]\n'
            f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = "1s"\n' + SOURCES,
        )
        code = main(["check", "-c", str(main_file)])
    out, err = capsys.readouterr()
    assert code == 0
    assert f"shaping file {SHIPPED}" in out
    lines = [line for line in err.splitlines() if line.startswith("egressd: shaping")]
    warnings = "\n".join(line for line in lines if "shaping warning:" in line)
    assert f'{COMMUNITY}: [provider."gmail"]' in warnings  # no match: never applies
    for provider in ("barracuda", "netvigator", "kpn"):
        assert f'[provider."{provider}"]' in warnings, provider
    notices = [line for line in lines if "shaping notice:" in line]
    assert any("max_ready" in line for line in notices)
    assert len(notices) == len(set(notices))  # each MTA-only key named once


def test_check_fails_on_a_broken_shaping_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path / "shaping.toml", '["default"]\nconnection_limit = -1\n')
    main_file = write(tmp_path / "egressd.toml", 'shaping_files = ["shaping.toml"]\n' + SOURCES)
    assert main(["check", "-c", str(main_file)]) != 0
    _, err = capsys.readouterr()
    assert f"{tmp_path / 'shaping.toml'}: " in err and "connection_limit" in err


async def test_reload_rereads_the_shaping_files_all_or_none(tmp_path: Path) -> None:
    shaping = write(tmp_path / "shaping.toml", '["default"]\nconnection_limit = 3\n')
    main_file = write(tmp_path / "egressd.toml", 'shaping_files = ["shaping.toml"]\n' + SOURCES)
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(partial(serve, load_config(main_file), doors={}))
        shaper = daemon.runtime.shaper
        assert shaper is not None
        assert isinstance(shaper.open("a", GOOGLE), Lease)
        assert shaper.limits("a", GOOGLE).budgets[0].describe() == "connection_limit 3"
        shaping.write_text('["default"]\nconnection_limit = 1\n')
        assert await daemon.reload("test")
        assert daemon.runtime.shaper is shaper  # leases survive the reload
        assert shaper.limits("a", GOOGLE).budgets[0].describe() == "connection_limit 1"
        refusal = shaper.check_open("a", GOOGLE)
        assert refusal is not None and refusal.budget == "connection_limit"
        shaping.write_text('["default"]\nconnection_limit = "x"\n')
        assert not await daemon.reload("test")  # refused: the previous policy stays
        assert shaper.limits("a", GOOGLE).budgets[0].describe() == "connection_limit 1"
        nursery.cancel_scope.cancel()
