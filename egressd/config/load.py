"""Loading: read the files, merge the sources, validate, and raise every problem at once."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from egressd.config.jsonc import strip_json_comments
from egressd.config.model import (
    DEFAULT_CONFIG_PATH,
    Config,
    ControlSettings,
    MetricsSettings,
)
from egressd.config.problems import ConfigError, Problems, Where
from egressd.config.reader import ListOf, Reported, Table, Text, failed, read_table, read_value
from egressd.config.sources import SourcesDraft
from egressd.config.values import Endpoint, type_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

_SOURCES_FILE_KEYS = ("source", "pool")


def read_file(path: Path, where: Where, *, kumomta: bool = False) -> dict[str, Any] | None:
    """The tables of one file, or None (the problem recorded) when it cannot be read.

    With ``kumomta`` (a sources file), a name that does not end in ``.toml`` is JSON with
    comments, as KumoMTA's sources.lua reads it.
    """
    try:
        if kumomta and not path.name.endswith(".toml"):
            return _read_json(path, where)
        with path.open("rb") as handle:
            data: dict[str, Any] = tomllib.load(handle)
            return data
    except FileNotFoundError:
        where.error("file not found")
    except PermissionError:
        where.error("permission denied")
    except IsADirectoryError:
        where.error("is a directory, not a file")
    except tomllib.TOMLDecodeError as exc:
        where.error(f"not valid TOML: {exc}")
    except OSError as exc:
        where.error(f"cannot be read: {exc.strerror}")
    return None


def _read_json(path: Path, where: Where) -> dict[str, Any] | None:
    try:
        data = json.loads(strip_json_comments(path.read_text(encoding="utf-8")))
    except UnicodeDecodeError:
        where.error("not valid JSON: not UTF-8 text")
        return None
    except json.JSONDecodeError as exc:
        where.error(f"not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})")
        return None
    if not isinstance(data, dict):
        where.error(f"not a sources file: expected a JSON object, got {type_name(data)}")
        return None
    return data


def _read_main(path: Path) -> tuple[Where, dict[str, Any]]:
    """The main file's place (for problems) and its tables; ConfigError when unreadable."""
    main = Where(Problems(), str(path))
    data = read_file(path, main)
    if data is None:
        raise ConfigError(main.problems.items)
    return main, data


def load_config(path: str | Path) -> Config:
    """Read, merge and validate a configuration; raise :class:`ConfigError` listing all errors."""
    main_path = Path(path)
    main, data = _read_main(main_path)
    problems = main.problems
    draft = SourcesDraft()
    draft.add_file(data, main)
    source_files = _sources_files(data, main, main_path)
    for extra in source_files:
        _add_sources_file(draft, extra, Where(problems, str(extra)))
    pools = draft.build_pools()
    given = {
        "path": main_path,
        "sources": MappingProxyType(draft.build_sources()),
        "pools": MappingProxyType(pools),
        "source_files": source_files,
        "shaping_files": _listed_files(data, main, main_path, "shaping_files"),
        "key_files": draft.key_files(),
    }
    try:
        config = read_table(Config, data, main, **given)
    except Reported:
        problems.raise_if_any()
        raise  # pragma: no cover - Reported always comes with a problem
    _check_references(main, config)
    problems.raise_if_any()
    return config


def _sources_files(data: Mapping[str, Any], main: Where, main_path: Path) -> tuple[Path, ...]:
    return _listed_files(data, main, main_path, "sources_files")


def _listed_files(
    data: Mapping[str, Any], main: Where, main_path: Path, key: str
) -> tuple[Path, ...]:
    """The files a list key names, relative to the main file (absolute names stay)."""
    if key not in data:
        return ()
    names = read_value(ListOf(Text()), data[key], main.at(key))
    if failed(names):
        return ()
    return tuple(main_path.parent / name for name in names)


def _add_sources_file(draft: SourcesDraft, path: Path, where: Where) -> None:
    data = read_file(path, where, kumomta=True)
    if data is None:
        return
    for key in data:
        if key not in _SOURCES_FILE_KEYS:
            where.at(key).error("unknown key (a sources file holds only source and pool)")
    draft.add_file(data, where)


def _check_references(main: Where, config: Config) -> None:
    """Pools named by listeners, sender maps and users exist; no address is listened on twice."""
    doors = (
        ("socks5.listener", config.socks5_listeners),
        ("proxy.listener", config.proxy_listeners),
        ("smtp.listener", config.smtp.listeners),
    )
    seen: dict[tuple[str, Endpoint], str] = {}
    for door, listeners in doors:
        for index, listener in enumerate(listeners):
            path = f"{door}[{index}]"
            if listener.pool is not None and listener.pool not in config.pools:
                main.at(path).at("pool").error(f'"{listener.pool}" is not a defined pool')
            # Port 0 (any free port) may stand once per door: each gets a port of its own.
            mark = (door if not listener.address.port else "", listener.address)
            if mark in seen:
                main.at(path).at("address").error(
                    f"{listener.address} is already used by {seen[mark]}"
                )
            seen[mark] = path
    for key, pool in config.smtp.sender_pools.items():
        if pool not in config.pools:
            main.at(f'smtp.sender_pools: "{key}"').error(f'"{pool}" is not a defined pool')
    _check_warmup_references(main, config)
    for name, user in config.auth.items():
        if user.pools is None and name not in config.pools:
            main.at(f'auth.users: "{name}"').error(
                "names no defined pool (the username is the pool)"
            )
        pools_at = main.at("auth").at("users").at(name).at("pools")
        if user.pools == ():
            pools_at.error("lists no pool")
        for index, pool in enumerate(user.pools or ()):
            if pool not in config.pools:
                pools_at.item(index).error(f'"{pool}" is not a defined pool')


def _check_warmup_references(main: Where, config: Config) -> None:
    """Warm-up plans named by sources exist; ``[warmup.sources]`` names defined sources."""
    for name, source in config.sources.items():
        if source.warmup is not None and source.warmup not in config.warmup.plans:
            main.at(f'source "{name}"').at("warmup").error(
                f'"{source.warmup}" is not a defined plan ([warmup.plan.NAME])'
            )
    for name, plan in config.warmup.source_plans.items():
        at = main.at(f'warmup.sources: "{name}"')
        if name not in config.sources:
            at.error("names a source that is not defined in any file")
        elif config.sources[name].warmup not in (None, plan):
            at.error(
                f'says "{plan}" but the source\'s own warmup key says '
                f'"{config.sources[name].warmup}"; set one'
            )


def config_path_from(cli_value: str | None, environ: Mapping[str, str]) -> str:
    """-c/--config, else $EGRESSD_CONFIG, else the default path."""
    return cli_value or environ.get("EGRESSD_CONFIG") or DEFAULT_CONFIG_PATH


def load_status_endpoints(path: str | Path) -> Config:
    """Only ``[control]`` and ``[metrics]`` of a main file, ignoring every other table.

    ``egressd status`` uses it when the file on disk no longer validates: the running
    daemon still answers on the addresses it was started with.
    """
    main_path = Path(path)
    main, data = _read_main(main_path)
    control = read_value(Table(ControlSettings), data.get("control", {}), main.at("control"))
    metrics = read_value(Table(MetricsSettings), data.get("metrics", {}), main.at("metrics"))
    main.problems.raise_if_any()
    empty: Mapping[str, Any] = MappingProxyType({})
    return Config(path=main_path, sources=empty, pools=empty, control=control, metrics=metrics)
