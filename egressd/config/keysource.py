"""KumoMTA's KeySource (crates/data-loader), as ``socks5_proxy_password`` takes it.

Theory of operation
-------------------
KumoMTA reads a secret from one of four forms:

* a plain string: the **path of a file** that holds the secret (its bytes, as they are: a
  trailing newline is part of the password, so write the file with ``printf``, not
  ``echo``);
* ``{ key_data = "..." }``: the secret inline (KumoMTA's own integration test uses it);
* ``{ vault_mount = ..., vault_path = ... }``: HashiCorp Vault;
* ``{ event_name = ..., event_args = [...] }``: a Lua callback.

egressd supports the first two and refuses the Vault and event forms with an error naming
the file and the key, rather than sending something else. A relative path is taken from the
directory of the file that names it (KumoMTA takes it from kumod's working directory, the
same thing for an absolute path). The file is read when the configuration is loaded, so
again at each reload; the daemon also watches it like a configuration file.
"""

from __future__ import annotations

from pathlib import Path

from egressd.config.problems import Where
from egressd.config.reader import expect
from egressd.config.values import quote, type_name

MAX_SECRET = 255
"""RFC 1929 gives a password at most 255 bytes."""

_VAULT_KEYS = frozenset({"vault_address", "vault_token", "vault_mount", "vault_path", "vault_key"})
_EVENT_KEYS = frozenset({"event_name", "event_args"})


def key_file(value: object, where: Where) -> Path | None:
    """The file a KeySource names (its plain-string form), resolved as :class:`Password` does."""
    if not isinstance(value, str):
        return None
    return Path(where.file).parent / value


class Password:
    """A KeySource read to the password it holds (text, at most 255 bytes of UTF-8)."""

    def read(self, value: object, where: Where) -> str:
        if isinstance(value, str):
            path = key_file(value, where)
            assert path is not None
            return _check(_read_file(path), f"the file {quote(str(path))}")
        table = expect(value, dict, 'a file name or a table such as { key_data = "..." }')
        return self._read_table(table, where)

    def _read_table(self, table: dict[str, object], where: Where) -> str:
        keys = set(table)
        if keys & _VAULT_KEYS:
            raise ValueError(
                "is a Vault KeySource, which egressd does not read; give the path of a file "
                'holding the password, or { key_data = "..." }'
            )
        if keys & _EVENT_KEYS:
            raise ValueError(
                "is an event KeySource (a Lua callback), which egressd cannot run; give the path "
                'of a file holding the password, or { key_data = "..." }'
            )
        if keys != {"key_data"}:
            unknown = ", ".join(sorted(keys - {"key_data"})) or "no key_data"
            raise ValueError(f"is a KeySource table with {unknown}; expected key_data")
        data = table["key_data"]
        if not isinstance(data, str):
            raise ValueError(f"key_data: expected a string, got {type_name(data)}")
        return _check(data.encode(), "key_data")


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"names the file {quote(str(path))}, which does not exist") from None
    except PermissionError:
        raise ValueError(f"names the file {quote(str(path))}, which egressd may not read") from None
    except OSError as exc:
        raise ValueError(f"names the file {quote(str(path))}: {exc.strerror}") from None


def _check(secret: bytes, what: str) -> str:
    if not secret:
        raise ValueError(f"is empty ({what} holds no password)")
    if len(secret) > MAX_SECRET:
        raise ValueError(f"is {len(secret)} bytes long ({what}); SOCKS5 allows at most 255")
    try:
        return secret.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"is not UTF-8 text ({what})") from None
