"""Every reply egressd itself gives an MTA on the SMTP door, built in this one module.

Theory of operation
-------------------
A cut-through relay passes the remote server's own replies on unchanged; the replies below
are the ones egressd has to make up: when there is no remote reply to pass on (the remote
could not be reached, dropped the connection or went silent), when egressd refuses on its
own account (no pool, another next hop, a message over the advertised SIZE, a body that
did not end cleanly), and the session replies of the door itself (greeting, RSET, QUIT,
drain, timeouts).

Rules every failure here follows (RFC 5321 section 4.2.5, RFC 3463):

* a failure that may go away is a 4xx, so the MTA keeps the message and retries; a 5xx is
  given only where retrying cannot help (the next hop's permanent DNS answers, a message
  over the advertised SIZE, an address the remote cannot take);
* the text says what failed and where: the source (name and address), the remote's name
  and address, and the error, so a deferred message in the MTA's queue explains itself;
* the text never holds CR or LF (a reply line cannot be split by an error message).

Typed failures from below are mapped here, not where they are raised:
:class:`~egressd.relay.events.RemoteTimedOut` and :class:`~egressd.relay.events.RemoteLost`
(the remote connection), the next hop's DNS failures (:func:`next_hop_failure`, from the
kind and text that :mod:`egressd.net.mx` reports), and the open path's
refusals (pool, source, addresses).

The session replies that depend on nothing or on the configuration only (the greeting, the
250 to MAIL, RSET, QUIT...) are built once and cached (:func:`_once`): a :class:`Reply` is
immutable and caches its own bytes, so the MTA's every message reuses both.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar, cast

from egressd.proto.smtp_common import Reply
from egressd.relay.events import RemoteLost, RemoteTimedOut

__all__ = [
    "another_next_hop",
    "auth_failed",
    "auth_required",
    "auth_succeeded",
    "body_aborted",
    "closing",
    "denied_next_hop",
    "draining",
    "egress_failure",
    "greeting",
    "helo",
    "help_text",
    "local",
    "message_budget",
    "mta_sts_no_mx",
    "mta_timeout",
    "mta_too_slow",
    "next_hop_failure",
    "no_first_mail",
    "no_mail_server",
    "no_pool",
    "no_remote_transaction",
    "no_smtputf8",
    "no_usable_address",
    "noop",
    "oversize",
    "pool_unnamed",
    "refused_at_capacity",
    "remote_failure",
    "remote_failure_detail",
    "remote_gone",
    "reset",
    "sender_ok",
    "temporary",
    "tls_ready",
    "tls_unavailable",
    "too_many_auth_failures",
    "under_policy",
    "vrfy",
]


_Builder = TypeVar("_Builder", bound=Callable[..., Reply])


def _once(builder: _Builder) -> _Builder:
    """Cache a reply builder whose arguments come from a small set (the configuration's
    names), keeping its signature for the type checker."""
    return cast(_Builder, functools.lru_cache(maxsize=256)(builder))


def temporary(enhanced: str, text: str, code: int = 451) -> Reply:
    """A reply egressd itself gives the MTA (``451 4.x.y text``); CR and LF become spaces."""
    return Reply.make(code, text.replace("\r", " ").replace("\n", " "), enhanced=enhanced)


def local(code: int, enhanced: str, text: str) -> Reply:
    """A session reply of egressd's own (greeting, RSET, QUIT, AUTH, NOOP ...)."""
    return Reply.make(code, text, enhanced=enhanced)


# --------------------------------------------------------------------------- session


@_once
def greeting(hostname: str) -> Reply:
    """The 220 banner, without an enhanced status code: the client has not said EHLO yet
    (RFC 2034 section 4: the codes are only for clients that asked for ENHANCEDSTATUSCODES)."""
    return Reply.make(220, f"{hostname} ESMTP egressd")


@_once
def reset() -> Reply:
    return local(250, "2.0.0", "Reset state")


@_once
def helo(hostname: str) -> Reply:
    """The reply to HELO (EHLO's lists the extensions: the SmtpServer machine builds it)."""
    return local(250, "2.0.0", hostname)


@_once
def noop() -> Reply:
    return local(250, "2.0.0", "OK")


@_once
def vrfy() -> Reply:
    return local(252, "2.5.0", "Cannot VRFY; send the message and see")


@_once
def help_text() -> Reply:
    return local(214, "2.0.0", "egressd relays mail; see RFC 5321")


@_once
def tls_ready() -> Reply:
    return local(220, "2.0.0", "Ready to start TLS")


def tls_unavailable() -> Reply:
    """STARTTLS offered, but the certificate does not load (the log says why)."""
    return local(454, "4.7.0", "TLS not available")


@_once
def closing(hostname: str) -> Reply:
    return local(221, "2.0.0", f"{hostname} closing connection")


def draining(hostname: str) -> Reply:
    """The daemon is stopping: said at a command boundary outside any transaction."""
    return local(421, "4.3.2", f"{hostname} shutting down; try again later")


def refused_at_capacity(hostname: str, reason: str) -> Reply:
    """A connection beyond a ``[limits]`` cap, refused at once."""
    return local(421, "4.3.2", f"{hostname} {reason}; try again later")


def mta_timeout(hostname: str, in_data: bool) -> Reply:
    what = "the message body" if in_data else "a command"
    return local(421, "4.4.2", f"{hostname} timeout waiting for {what}")


@_once
def auth_succeeded() -> Reply:
    return local(235, "2.7.0", "Authentication succeeded")


@_once
def auth_failed() -> Reply:
    return local(535, "5.7.8", "Authentication credentials invalid")


def too_many_auth_failures(hostname: str) -> Reply:
    """After the last allowed failed AUTH of a connection, then egressd closes it (as
    Postfix does when a client reaches ``smtpd_hard_error_limit``)."""
    return local(421, "4.7.0", f"{hostname} Error: too many failed authentications")


@_once
def auth_required() -> Reply:
    """MAIL from a client that did not authenticate, where the listener requires it.

    A 4xx, not RFC 4954's ``530 5.7.0`` (a SHOULD): the client is an MTA relaying its
    users' mail, and a sender its operator forgot to give a login must stay in its queue
    until the map is fixed, not bounce back to the user."""
    return local(451, "4.7.0", "Authentication required")


@_once
def sender_ok(pool: str, why: str, named: bool) -> Reply:
    """250 to MAIL; the pool is named only to an authenticated client."""
    return local(250, "2.1.0", f"Sender OK (pool {pool} by {why})" if named else "Sender OK")


def no_first_mail(hostname: str, seconds: float) -> Reply:
    """``[smtp.timeouts] first_mail`` passed without a MAIL that started a transaction."""
    return local(421, "4.4.2", f"{hostname} no mail transaction within {seconds:g}s")


def mta_too_slow(hostname: str, rate: int) -> Reply:
    """The body came slower than ``[smtp.timeouts] min_data_rate``."""
    return local(421, "4.4.2", f"{hostname} message body slower than {rate} bytes/s")


def no_pool(sender: str) -> Reply:
    return local(
        451,
        "4.3.5",
        f"no pool for sender <{sender}>: not authenticated, no"
        " [smtp.sender_pools] entry, and the listener has no pool",
    )


# --------------------------------------------------------------------------- recipients


def another_next_hop(domain: str, connected_domain: str, remote_text: str) -> Reply:
    """RCPT for a domain this transaction's remote does not serve: the MTA sends it later."""
    return Reply.make(
        452,
        f"{domain} has another next hop than {connected_domain}"
        f" ({remote_text}); send it in another transaction",
        enhanced="4.5.3",
    )


def no_recipient_domain(address: str) -> Reply:
    """RCPT TO:<Postmaster> (RFC 5321 4.5.1): this host's own postmaster. egressd keeps
    no mailbox and can relay only to a domain's next hop, so it is refused for good."""
    return local(
        550,
        "5.1.1",
        f"<{address}> is the relay's own postmaster: egressd delivers no mail itself;"
        " address a domain (postmaster@domain)",
    )


def no_smtputf8() -> Reply:
    return Reply.make(553, "Remote server does not support SMTPUTF8", enhanced="5.6.7")


#: The next hop's problems (:class:`egressd.net.mx.NextHopProblem`) as replies.
_NEXT_HOP_CODES: dict[str, tuple[int, str]] = {
    "no_such_domain": (550, "5.1.2"),  # NXDOMAIN
    "null_mx": (556, "5.1.10"),  # RFC 7505
    "no_mail_host": (550, "5.4.4"),  # no MX and no address record
    "bad_literal": (501, "5.1.3"),
    "dns_failure": (451, "4.4.3"),  # a timeout, SERVFAIL or REFUSED may clear up
    "no_address": (451, "4.4.4"),  # another source, or a fixed DNS, may do better
}


def next_hop_failure(kind: str, text: str) -> Reply:
    """The next hop cannot be found: NXDOMAIN 550 5.1.2, null MX 556 5.1.10, no MX and no
    address 550 5.4.4, a bad literal 501 5.1.3, DNS trouble 451 4.4.3, no address of the
    source's family 451 4.4.4."""
    code, enhanced = _NEXT_HOP_CODES.get(kind, (451, "4.4.3"))
    return temporary(enhanced, text, code)


# --------------------------------------------------------------------------- opening


#: The egress's failure kinds (:class:`egressd.egress.Failure`) that mean "no source".
_NO_SOURCE = frozenset({"unknown_pool", "no_sources", "source_limit", "warmup_quota"})


def egress_failure(pool: str, kind: str, detail: str) -> Reply:
    """The egress gave no connection (``kind`` and ``detail`` of an
    :class:`~egressd.egress.EgressFailure`): the pool gave no source (unknown pool
    ``4.3.5``, every source suspended, at its cap or out of its warm-up quota ``4.4.5``),
    or the source's own fault
    (unplumbed address, proxy down) on every source tried (``4.3.0``)."""
    if kind == "budget":  # shaping: every source's budget towards this destination is used
        return temporary("4.7.0", detail)
    if kind in _NO_SOURCE:
        enhanced = "4.3.5" if kind == "unknown_pool" else "4.4.5"
        return temporary(enhanced, f"pool {pool}: {detail}")
    return temporary("4.3.0", detail)


def pool_unnamed(reply: Reply, pool: str) -> Reply:
    """``reply`` without the ``pool NAME:`` that :func:`egress_failure` puts first, for a
    client that did not authenticate (it is told no pool's name)."""
    prefix = f"{reply.enhanced} pool {pool}: " if reply.enhanced else f"pool {pool}: "
    lines = tuple(line.removeprefix(prefix) for line in reply.lines)
    if lines == reply.lines:
        return reply
    return temporary(reply.enhanced or "4.3.0", " ".join(lines), reply.code)


def denied_next_hop(domain: str) -> Reply:
    return temporary(
        "4.4.4", f"every address of the next hop of {domain} is in access.deny_destinations"
    )


def no_usable_address(domain: str) -> Reply:
    return temporary("4.4.4", f"no usable address for {domain}")


def no_mail_server(source_text: str, domain: str, failures: list[str]) -> Reply:
    """Every address of every host of the next hop failed; each failure is listed."""
    return temporary(
        "4.4.1",
        f"{source_text}: no mail server of {domain} could be used: " + "; ".join(failures),
    )


def mta_sts_no_mx(domain: str, origin: str, hosts: list[str]) -> Reply:
    """MTA-STS enforce: no MX host of the domain matches its policy (RFC 8461 section 5)."""
    return temporary(
        "4.7.5", f"no MX host of {domain} ({', '.join(hosts)}) is allowed by the {origin}"
    )


def under_policy(detail: str, origin: str) -> str:
    """A host's TLS failure, naming the policy that required TLS (for the 4xx's list)."""
    return f"{detail} (required by the {origin})" if origin else detail


# --------------------------------------------------------------------------- remote


def remote_failure(describe: str, what: str, enhanced: str = "4.4.2") -> Reply:
    """The remote conversation failed: ``describe`` names the source and the remote."""
    return temporary(enhanced, f"{describe}: {what}")


def remote_failure_detail(what: str, failure: RemoteTimedOut | RemoteLost) -> str:
    """What went wrong while sending ``what`` (or waiting for its reply)."""
    if isinstance(failure, RemoteTimedOut):
        if failure.sending:
            return f"timed out after {failure.seconds:g}s sending {what}"
        return f"no reply to {what} within {failure.seconds:g}s"
    if failure.how == "closed":
        return f"connection closed by the remote in reply to {what}"
    if failure.how == "violation":
        return f"protocol violation in reply to {what}: {failure.detail}"
    doing = "sending" if failure.sending else "waiting for the reply to"
    return f"connection lost {doing} {what}: {failure.detail}"


def no_remote_transaction() -> Reply:
    return temporary("4.3.0", "no open transaction with the remote server")


def remote_gone() -> Reply:
    return temporary("4.3.0", "the remote connection is gone")


def message_budget(reason: str) -> Reply:
    """A shaping budget per message (``max_message_rate``...) holds the message back:
    nothing went to the remote; the MTA retries later."""
    return temporary("4.7.0", f"shaping: {reason}")


# --------------------------------------------------------------------------- the body


def oversize(limit: int) -> Reply:
    return Reply.make(552, f"Message exceeds the maximum size of {limit} bytes", enhanced="5.3.4")


def body_aborted(why: str) -> Reply:
    """The body did not end cleanly; the remote was closed without the final dot."""
    return temporary("4.3.0", why)
