"""The declarative reader: a TOML table -> a frozen dataclass, driven by its fields.

Theory of operation
-------------------
A configuration dataclass says how each of its fields is read with :func:`setting`: the
field's default (the only place a default is written), the :class:`Kind` of value the key
holds, and the key's name in the file when it differs from the field's. :func:`read_table`
walks the dataclass's fields, reads each key that is present with its kind, keeps the
default for each one that is absent, reports a required key that is missing, and reports
every key of the table that no field names ("unknown key": a typo must not pass). There is
no hand-kept list of keys: the dataclass is the list.

A kind turns one TOML value into a Python value. It raises ValueError with a message about
that value, or :class:`Reported` when it has already recorded problems of its own (a nested
table, an array). A dataclass may add checks across its fields with a ``check_keys(self,
at)`` method that reports through ``at(key)``.

Every problem goes to :class:`~egressd.config.problems.Problems` with its file and key path,
and reading goes on: one pass finds every problem of a file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from types import MappingProxyType
from typing import Any, Generic, Protocol, TypeVar

from egressd.config.problems import Where
from egressd.config.values import quote, type_name

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
D = TypeVar("D")

_SPEC = "egressd.config"


class Reported(Exception):
    """A value was wrong and its problems are already recorded."""


class Kind(Protocol[T_co]):
    """How one TOML value is read: ``read(value, where)`` -> the Python value."""

    def read(self, value: object, where: Where) -> T_co: ...


@dataclass(frozen=True)
class Spec:
    """How a dataclass field is read: its key in the file and its kind.

    ``kind`` None means the key is valid here but another reader handles it (the
    ``[source]`` and ``[pool]`` tables of the main file).
    """

    key: str | None
    kind: Kind[Any] | None


def setting(
    kind: Kind[Any] | None,
    default: Any = MISSING,
    *,
    factory: Callable[[], Any] | Any = MISSING,
    key: str | None = None,
) -> Any:
    """A dataclass field read from key ``key`` (default: the field's name) as ``kind``.

    Without ``default`` or ``factory`` the key is required.
    """
    metadata = {_SPEC: Spec(key, kind)}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def keys_of(cls: type[Any]) -> dict[str, Field[Any]]:
    """The keys a table read as ``cls`` may hold, each with its field."""
    found = {}
    for item in fields(cls):
        spec: Spec | None = item.metadata.get(_SPEC)
        if spec is not None:
            found[spec.key or item.name] = item
    return found


def _is_required(item: Field[Any]) -> bool:
    return item.default is MISSING and item.default_factory is MISSING


def read_table(cls: type[D], data: Mapping[str, Any], where: Where, **given: Any) -> D:
    """``data`` read as the dataclass ``cls``; ``given`` fills fields the file does not hold.

    Raises :class:`Reported` when any key was wrong (its problems are recorded).
    """
    return read_keys(
        cls, {key: (value, where.at(key)) for key, value in data.items()}, where, given
    )


def read_keys(
    cls: type[D],
    entries: Mapping[str, tuple[object, Where]],
    where: Where,
    given: Mapping[str, Any] | None = None,
) -> D:
    """Like :func:`read_table`, for keys that may each come from a different file."""
    problems = where.problems
    before = len(problems.items)
    known = keys_of(cls)
    values: dict[str, Any] = dict(given or {})
    for key, item in known.items():
        kind = item.metadata[_SPEC].kind
        if kind is None or item.name in values:
            continue
        if key in entries:
            value, at = entries[key]
            read = read_value(kind, value, at)
            if read is not _FAILED:
                values[item.name] = read
        elif _is_required(item):
            where.at(key).error("is required")
    for key, (_, at) in entries.items():
        if key not in known:
            at.error("unknown key")
    if len(problems.items) > before:
        raise Reported
    result = cls(**values)
    check = getattr(result, "check_keys", None)
    if check is not None:
        check(lambda key: entries[key][1] if key in entries else where.at(key))
        if len(problems.items) > before:
            raise Reported
    return result


_FAILED: Any = object()


def read_value(kind: Kind[T], value: object, where: Where) -> T:
    """``value`` read as ``kind``, or a marker (problems recorded) when it is wrong."""
    try:
        return kind.read(value, where)
    except ValueError as exc:
        where.error(str(exc))
    except Reported:
        pass
    return _FAILED  # type: ignore[no-any-return]


def failed(value: object) -> bool:
    return value is _FAILED


# --------------------------------------------------------------------------- kinds


def expect(value: object, kind: type[T], what: str) -> T:
    """``value`` when it is a ``kind`` (a boolean is never a number); ValueError otherwise."""
    if isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool):
        return value
    raise ValueError(f"expected {what}, got {type_name(value)}")


class Text:
    def read(self, value: object, where: Where) -> str:
        return expect(value, str, "a string")


class Flag:
    def read(self, value: object, where: Where) -> bool:
        return expect(value, bool, "a boolean (true or false)")


@dataclass(frozen=True)
class Integer:
    low: int
    high: int

    def read(self, value: object, where: Where) -> int:
        number = expect(value, int, "an integer")
        if not self.low <= number <= self.high:
            raise ValueError(f"{number} is outside {self.low}-{self.high}")
        return number


@dataclass(frozen=True)
class Parsed(Generic[T]):
    """A string turned into a value by ``parse``; its ValueError is about the quoted text."""

    parse: Callable[[str], T]

    def read(self, value: object, where: Where) -> T:
        text = expect(value, str, "a string")
        try:
            return self.parse(text)
        except ValueError as exc:
            raise ValueError(f"{quote(text)} {exc}") from None


@dataclass(frozen=True)
class Choice:
    """One string among ``options``; with ``fold``, compared and kept in lower case."""

    options: tuple[str, ...]
    fold: bool = False

    def read(self, value: object, where: Where) -> str:
        text = expect(value, str, "a string")
        chosen = text.lower() if self.fold else text
        if chosen not in self.options:
            names = ", ".join(quote(option) for option in self.options)
            raise ValueError(f"{quote(text)} is not one of {names}")
        return chosen


@dataclass(frozen=True)
class ListOf(Generic[T]):
    """An array; each item read as ``item`` and reported as ``key[index]``."""

    item: Kind[T]

    def read(self, value: object, where: Where) -> tuple[T, ...]:
        items = expect(value, list, "an array")
        read = [read_value(self.item, item, where.item(index)) for index, item in enumerate(items)]
        if any(failed(item) for item in read):
            raise Reported
        return tuple(read)


@dataclass(frozen=True)
class MapOf(Generic[T]):
    """A table of any keys, each value read as ``item``; with ``fold``, keys in lower case."""

    item: Kind[T]
    fold: bool = False

    def read(self, value: object, where: Where) -> Mapping[str, T]:
        table = expect(value, dict, "a table")
        read = {key: read_value(self.item, item, where.at(key)) for key, item in table.items()}
        if any(failed(item) for item in read.values()):
            raise Reported
        return MappingProxyType({(k.lower() if self.fold else k): v for k, v in read.items()})


@dataclass(frozen=True)
class Table(Generic[T]):
    """A table read as the dataclass ``cls``."""

    cls: type[T]

    def read(self, value: object, where: Where) -> T:
        return read_table(self.cls, expect(value, dict, "a table"), where)


@dataclass(frozen=True)
class Tables(Generic[T]):
    """An array of tables (``[[...]]``), each read as the dataclass ``cls``."""

    cls: type[T]

    def read(self, value: object, where: Where) -> tuple[T, ...]:
        return ListOf(Table(self.cls)).read(value, where)


@dataclass(frozen=True)
class Section(Generic[T]):
    """A table read as ``cls``, of which only the field ``attribute`` is kept."""

    cls: type[Any]
    attribute: str

    def read(self, value: object, where: Where) -> T:
        read: T = getattr(Table(self.cls).read(value, where), self.attribute)
        return read
