"""Configuration problems as records: which file, which key path, what is wrong.

Readers never raise on the first problem: each one is added to a :class:`Problems` list
through a :class:`Where` (a file and a key path), so ``egressd check`` shows every problem at
once. :class:`ConfigError` carries them all, both as records (``problems``, for tests and
tools) and as the lines operators read (``errors``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    """One problem: ``file``, the ``key`` path inside it ("" for the file itself), ``message``."""

    file: str
    key: str
    message: str

    def __str__(self) -> str:
        return (
            f"{self.file}: {self.key}: {self.message}"
            if self.key
            else f"{self.file}: {self.message}"
        )


class ConfigError(Exception):
    """Every problem found in a configuration, each naming its file and key path."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        self.errors = [str(problem) for problem in self.problems]
        super().__init__("\n".join(self.errors))


@dataclass
class Problems:
    """The problems found so far while reading one configuration."""

    items: list[Problem] = field(default_factory=list)

    def add(self, file: str, key: str, message: str) -> None:
        self.items.append(Problem(file, key, message))

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


@dataclass(frozen=True)
class Where:
    """A place in a configuration: a file and a key path such as ``source "ip-1": ttl``."""

    problems: Problems
    file: str
    path: str = ""

    def at(self, key: str) -> Where:
        """The place of ``key`` inside this table."""
        return Where(self.problems, self.file, f"{self.path}: {key}" if self.path else key)

    def item(self, index: int) -> Where:
        """The place of item ``index`` of this array: ``clients[0]``."""
        return Where(self.problems, self.file, f"{self.path}[{index}]")

    def error(self, message: str) -> None:
        self.problems.add(self.file, self.path, message)
