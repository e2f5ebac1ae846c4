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

import trio

from egressd.log import get_logger
from egressd.net.connection import Connection

__all__ = ["TlsConnection", "client_context", "load_server_context", "server_context"]

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


def server_context(
    certificate: str, private_key: str, client_ca: str | None = None
) -> ssl.SSLContext:
    """The context for TLS from a client (STARTTLS from an MTA, a SOCKS5 listener's TLS),
    with egressd's certificate chain and key as the files are now, or, when they cannot
    be loaded now (a renewal that left a key that does not match the certificate), the
    last context these paths gave: a bad renewal is refused by ``check`` and by a reload,
    and clients keep getting the certificate that worked. With ``client_ca`` (mutual TLS)
    a client must present a certificate issued by one of the CAs in that file.

    Raises ``OSError`` / ``ssl.SSLError`` when the files cannot be loaded and never could.
    """
    paths = (certificate, private_key, client_ca)
    try:
        context = load_server_context(certificate, private_key, client_ca)
    except (OSError, ssl.SSLError) as exc:
        kept = _LAST_GOOD.get(paths)
        if kept is None:
            raise
        _warn_once(paths, exc)
        return kept
    _LAST_GOOD[paths] = context
    return context


def load_server_context(
    certificate: str, private_key: str, client_ca: str | None = None
) -> ssl.SSLContext:
    """The files as they are now, loaded (cached by their identity); raises ``OSError`` /
    ``ssl.SSLError`` when they cannot be read or do not match."""
    identity = (
        file_identity(certificate),
        file_identity(private_key),
        file_identity(client_ca) if client_ca is not None else None,
    )
    return _load_server_context(certificate, private_key, client_ca, identity)


_Paths = tuple[str, str, str | None]
_LAST_GOOD: dict[_Paths, ssl.SSLContext] = {}
_WARNED: set[tuple[_Paths, str]] = set()


def _warn_once(paths: _Paths, exc: Exception) -> None:
    if (paths, str(exc)) in _WARNED:
        return
    _WARNED.add((paths, str(exc)))
    log.warning(
        "cannot load certificate %s with key %s (%s): still serving the previous one",
        paths[0],
        paths[1],
        exc,
    )


@functools.lru_cache(maxsize=8)
def _load_server_context(
    certificate: str,
    private_key: str,
    client_ca: str | None,
    identity: tuple[FileIdentity, FileIdentity, FileIdentity | None],
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, private_key)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class TlsConnection(trio.abc.HalfCloseableStream):
    """A server-side TLS stream over a :class:`Connection` that can be half-closed.

    ``send_eof`` sends the TLS close_notify and keeps reading, so a relay can tell the
    client that the destination is done while the client still talks (trio's SSLStream
    has no half-close of its own; this reaches into it the way its ``aclose`` does).
    """

    def __init__(self, tls: trio.SSLStream[Connection]) -> None:
        self.tls = tls
        self.transport_stream = tls.transport_stream
        self.peer = self.transport_stream.peer

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.tls.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.tls.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.tls.receive_some(max_bytes)

    async def send_eof(self) -> None:
        """TLS close_notify, without waiting for the client's (trio's own ``aclose`` sends
        it the same way, through its ``_retry``): the client sees a clean end of data and
        may go on sending, as TLS 1.3 allows (RFC 8446 6.1)."""
        tls = self.tls
        with tls._outer_send_conflict_detector:
            await tls._retry(tls._ssl_object.unwrap, ignore_want_read=True)

    async def aclose(self) -> None:
        await self.tls.aclose()

    def peer_certificate_subject(self) -> str | None:
        """The verified client certificate's subject (mutual TLS), else None."""
        certificate = self.tls.getpeercert()
        if not certificate:
            return None
        subject = certificate.get("subject", ())
        return ",".join(f"{k}={v}" for rdn in subject for k, v in rdn)
