"""KumoMTA's ``[source.*]`` and ``[pool.*]`` tables, merged across files.

Files are read in order: the main file first, then each sources file. A source defined in
several files is merged key by key, the later file winning (as KumoMTA's sources.lua does),
and each key is checked against the file it came from. A pool entry listed in two files is
an error (KumoMTA silently counts it twice). A pool entry naming a source that no file
defines is an error (KumoMTA only warns).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from egressd.config.keysource import key_file
from egressd.config.model import Pool, PoolEntry, Source
from egressd.config.problems import Where
from egressd.config.reader import Reported, read_keys, read_table
from egressd.config.values import quote, type_name


@dataclass
class SourcesDraft:
    """Sources and pool entries of every file read so far, not yet validated."""

    sources: dict[str, dict[str, tuple[object, Where]]] = field(default_factory=dict)
    """Source name -> key -> (value, where it was set): the later file's value wins."""
    first_seen: dict[str, Where] = field(default_factory=dict)
    pools: dict[str, dict[str, tuple[Where, PoolEntry | None]]] = field(default_factory=dict)
    """Pool name -> source name -> (where it was listed, the entry; None when invalid)."""

    def add_file(self, data: Mapping[str, Any], where: Where) -> None:
        """Take the ``source`` and ``pool`` tables of one file."""
        self._add_sources(data.get("source", {}), where)
        self._add_pools(data.get("pool", {}), where)

    def _add_sources(self, tables: object, where: Where) -> None:
        if not isinstance(tables, dict):
            where.at("source").error(f"expected a table of sources, got {type_name(tables)}")
            return
        for name, keys in tables.items():
            at = where.at(f'source "{name}"')
            if not isinstance(keys, dict):
                at.error(f"expected a table, got {type_name(keys)}")
                continue
            self.first_seen.setdefault(name, at)
            merged = self.sources.setdefault(name, {})
            for key, value in keys.items():
                merged[key] = (value, at.at(key))

    def _add_pools(self, tables: object, where: Where) -> None:
        if not isinstance(tables, dict):
            where.at("pool").error(f"expected a table of pools, got {type_name(tables)}")
            return
        for pool_name, entries in tables.items():
            at = where.at(f'pool "{pool_name}"')
            if not isinstance(entries, dict):
                at.error(f"expected a table, got {type_name(entries)}")
                continue
            pool = self.pools.setdefault(pool_name, {})
            for source_name, entry in entries.items():
                self._add_entry(pool, source_name, entry, at.at(f'source "{source_name}"'))

    @staticmethod
    def _add_entry(
        pool: dict[str, tuple[Where, PoolEntry | None]], name: str, entry: object, at: Where
    ) -> None:
        if not isinstance(entry, dict):
            at.error(f"expected a table (pools have no keys of their own), got {type_name(entry)}")
            return
        try:
            read: PoolEntry | None = read_table(PoolEntry, entry, at, source=name)
        except Reported:
            read = None
        if name in pool:
            at.error(f"is already listed in {pool[name][0].file}; list each entry once")
            return
        pool[name] = (at, read)

    def build_sources(self) -> dict[str, Source]:
        """Every source whose merged keys are valid."""
        built: dict[str, Source] = {}
        for name, entries in self.sources.items():
            if not _same_name(name, entries):
                continue
            try:
                built[name] = read_keys(Source, entries, self.first_seen[name], {"name": name})
            except Reported:
                continue
        return built

    def key_files(self) -> tuple[Path, ...]:
        """The files named by ``socks5_proxy_password`` (KeySource's plain-string form)."""
        found = []
        for entries in self.sources.values():
            value, where = entries.get("socks5_proxy_password", (None, None))
            path = key_file(value, where) if where is not None else None
            if path is not None:
                found.append(path)
        return tuple(found)

    def build_pools(self) -> dict[str, Pool]:
        """Every pool, with the entries that are valid and name a defined source."""
        pools: dict[str, Pool] = {}
        for pool_name, entries in self.pools.items():
            kept = []
            for source_name, (at, entry) in entries.items():
                if source_name not in self.sources:
                    at.error("names a source that is not defined in any file")
                elif entry is not None:
                    kept.append(entry)
            pools[pool_name] = Pool(name=pool_name, entries=tuple(kept))
        return pools


def _same_name(name: str, entries: Mapping[str, tuple[object, Where]]) -> bool:
    """A ``name`` key must say the table's name: KumoMTA would rename the source otherwise."""
    if "name" not in entries:
        return True
    value, where = entries["name"]
    if value == name:
        return True
    shown = quote(value) if isinstance(value, str) else type_name(value)
    where.error(f"{shown} differs from the table's name {quote(name)}; drop it or make them equal")
    return False
