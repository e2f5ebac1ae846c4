"""`[warmup]`, its plans and sources, a source's `warmup` key, and `[state]`."""

from __future__ import annotations

from pathlib import Path

import pytest

from egressd.config import DEFAULT_PLAN, DEFAULT_PLAN_DAYS, ConfigError, load_config

SOURCES = """
[source."ip-1"]
source_address = "127.0.0.1"
[source."ip-2"]
source_address = "127.0.0.2"
[pool."p"."ip-1"]
[pool."p"."ip-2"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "egressd.toml"
    path.write_text(SOURCES + text)
    return path


def errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return [str(problem) for problem in caught.value.problems]


def test_plans_sources_and_settings_are_read(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
[warmup]
timezone = "Europe/Paris"
sending_day_share = "90%"
[warmup.plan.standard]
days = [20, 40]
[warmup.plan.standard.provider.google]
days = [10]
[warmup.sources]
"ip-2" = "standard"
[state]
directory = "/srv/egressd"
""",
        ),
    )
    plan = config.warmup.plans["standard"]
    assert plan.schedule("google") == (10,) and plan.schedule("yahoo") == (20, 40)
    assert config.warmup.sending_day_share == pytest.approx(0.9)
    assert config.warming_sources == {"ip-2": "standard"}
    assert config.state.directory == "/srv/egressd"


def test_a_source_opts_in_with_its_own_key_and_the_default_plan_exists(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    path.write_text(path.read_text().replace('"127.0.0.1"', '"127.0.0.1"\nwarmup = "default"'))
    config = load_config(path)
    assert config.warming_sources == {"ip-1": DEFAULT_PLAN}
    assert config.warmup.plans[DEFAULT_PLAN].days == DEFAULT_PLAN_DAYS


def test_a_file_may_replace_the_default_plan(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[warmup.plan.default]\ndays = [1, 2]\n"))
    assert config.warmup.plans[DEFAULT_PLAN].days == (1, 2)


def test_errors_name_the_file_and_the_key_path(tmp_path: Path) -> None:
    found = errors(
        tmp_path,
        """
[warmup]
timezone = "Mars/Olympus"
sending_day_share = 1.5
hold_deferral_rate = 0.6
[warmup.plan.empty]
days = []
[warmup.plan.bad]
days = [10, -1]
""",
    )
    file = str(tmp_path / "egressd.toml")
    assert f'{file}: warmup: timezone: "Mars/Olympus" is not a known time zone' in found
    assert f"{file}: warmup: sending_day_share: 1.5 is outside 0-1" in found
    assert any("plan: empty: days: needs at least one day" in line for line in found)
    assert any("plan: bad: days[1]: -1 is outside" in line for line in found)


def test_a_hold_threshold_above_its_step_back_threshold_is_refused(tmp_path: Path) -> None:
    found = errors(tmp_path, "[warmup]\nhold_deferral_rate = 0.6\n")
    assert any("hold_deferral_rate: is above step_back_deferral_rate" in f for f in found)


def test_unknown_plans_and_sources_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, '[warmup.sources]\n"ip-9" = "default"\n"ip-2" = "nope"\n')
    path.write_text(path.read_text().replace('"127.0.0.1"', '"127.0.0.1"\nwarmup = "nope"'))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    found = [str(p) for p in caught.value.problems]
    assert any('"nope" is not a defined plan' in line for line in found), found


def test_references_are_checked_once_the_tables_read(tmp_path: Path) -> None:
    path = write(tmp_path, '[warmup.sources]\n"ip-9" = "default"\n')
    path.write_text(path.read_text().replace('"127.0.0.1"', '"127.0.0.1"\nwarmup = "nope"'))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    found = [str(p) for p in caught.value.problems]
    assert any('source "ip-1": warmup: "nope" is not a defined plan' in f for f in found), found
    assert any('"ip-9": names a source that is not defined' in f for f in found), found
