"""TLS contexts for the SMTP relay: STARTTLS towards remote MXes and towards MTAs.

Theory of operation
-------------------
Outbound (RFC 3207 STARTTLS to a recipient's MX): mail servers mostly present certificates
that do not match their MX name, or are self-signed, so the default policy encrypts without
verifying (opportunistic TLS, RFC 7435): :func:`client_context` with ``verify=False``
accepts any certificate and still negotiates the best protocol the remote offers. With
``verify=True`` the system's trust store (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` honoured),
or only ``[smtp.tls] ca_file`` when it is set, and the MX name are checked, as Postfix's
``verify`` level does.

Inbound (an MTA sending STARTTLS to egressd): :func:`server_context` loads the configured
certificate chain and key.

Contexts are built once per setting and shared: an ``SSLContext`` is safe to use from
many connections, and loading a certificate or the trust store is not free. The server
context is keyed by the certificate and key files' identity (device, inode, size, mtime),
not only by their paths: a renewed certificate (certbot swaps the files, then runs
``systemctl reload``) is read at the next STARTTLS, where a cache by path would serve the
old one until a restart. The two ``stat`` calls per STARTTLS cost microseconds. Files that
cannot be loaded (a renewal gone wrong) do not take TLS away: the last context that loaded
from the same paths is served, with a warning, while ``check`` and a reload refuse them.
"""

from __future__ import annotations

import functools
import os
import ssl

from egressd.log import get_logger

__all__ = ["client_context", "load_server_context", "server_context"]

log = get_logger("tls")


@functools.lru_cache(maxsize=8)
def client_context(verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
    """The context for STARTTLS to a remote MX (and, verifying, for MTA-STS's policy
    fetch); ``ca_file`` replaces the system store when set. See the module doc."""
    if verify:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


FileIdentity = tuple[int, int, int, int]


def file_identity(path: str) -> FileIdentity:
    """What changes when a file is replaced or rewritten (raises OSError)."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def server_context(certificate: str, private_key: str) -> ssl.SSLContext:
    """The context for TLS from a client (STARTTLS from an MTA, a SOCKS5 listener's TLS),
    with egressd's certificate chain and key as the files are now, or, when they cannot
    be loaded now (a renewal that left a key that does not match the certificate), the
    last context these paths gave: a bad renewal is refused by ``check`` and by a reload,
    and clients keep getting the certificate that worked.

    Raises ``OSError`` / ``ssl.SSLError`` when the files cannot be loaded and never could.
    """
    try:
        context = load_server_context(certificate, private_key)
    except (OSError, ssl.SSLError) as exc:
        kept = _LAST_GOOD.get((certificate, private_key))
        if kept is None:
            raise
        _warn_once(certificate, private_key, exc)
        return kept
    _LAST_GOOD[certificate, private_key] = context
    return context


def load_server_context(certificate: str, private_key: str) -> ssl.SSLContext:
    """The files as they are now, loaded (cached by their identity); raises ``OSError`` /
    ``ssl.SSLError`` when they cannot be read or do not match."""
    identity = (file_identity(certificate), file_identity(private_key))
    return _load_server_context(certificate, private_key, identity)


_LAST_GOOD: dict[tuple[str, str], ssl.SSLContext] = {}
_WARNED: set[tuple[str, str, str]] = set()


def _warn_once(certificate: str, private_key: str, exc: Exception) -> None:
    key = (certificate, private_key, str(exc))
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(
            "cannot load certificate %s with key %s (%s): still serving the previous one",
            certificate,
            private_key,
            exc,
        )


@functools.lru_cache(maxsize=4)
def _load_server_context(
    certificate: str, private_key: str, identity: tuple[FileIdentity, FileIdentity]
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, private_key)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
