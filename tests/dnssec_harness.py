"""A DNSSEC-signed test DNS on loopback: nsd (authoritative), unbound (validating), dnsmasq.

Theory of operation
-------------------
:func:`signed_dns` writes one zone file per :class:`Zone`, signs the ``signed`` ones with
``ldns-keygen`` / ``ldns-signzone`` (one ECDSA P-256 key per zone, a few milliseconds),
serves them all from one ``nsd`` on a free loopback port, and puts a validating ``unbound``
in front, with the signed zones' DS records as its only trust anchors. Every zone is a
stub zone of unbound pointing at nsd, and so is the root: unbound never asks anything
outside loopback (the root's DNSKEY is SERVFAIL). Unsigned zones have no anchor, so their
answers come without the AD bit (insecure), the signed ones' with it. ``test.`` is one of
unbound's built-in refused zones (RFC 6761): ``local-zone: "test." nodefault`` lifts that.

:func:`forwarding_dnsmasq` is a dnsmasq that forwards everything to a server (unbound)
and, as dnsmasq does without ``--proxy-dnssec``, never passes the AD bit on: a resolver
that does not validate.

All three run in the foreground and are stopped by PID (``harness.start_process``);
together they start in well under a second.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness import free_port, require_binary, start_process


@dataclass(frozen=True)
class Zone:
    """A zone: its name, its records (zone-file lines, names relative to the zone or
    absolute), and whether it is signed."""

    name: str
    records: Sequence[str]
    signed: bool = True
    bogus: Sequence[str] = ()
    """Records added to the signed zone after signing (absolute names): no signature, so a
    validating resolver answers SERVFAIL for them."""


@dataclass(frozen=True)
class SignedDns:
    """The running servers: ``validating`` (unbound) and ``authoritative`` (nsd), each as
    ``[dns] nameservers`` wants them (``127.0.0.1:port``)."""

    validating: str
    authoritative: str


def zone_text(zone: Zone) -> str:
    head = [
        f"$ORIGIN {zone.name}.",
        "$TTL 300",
        f"@ IN SOA ns.{zone.name}. hostmaster.{zone.name}. 1 3600 600 86400 300",
        f"@ IN NS ns.{zone.name}.",
        "ns IN A 127.0.0.1",
    ]
    return "\n".join([*head, *zone.records]) + "\n"


def sign(zone: Zone, directory: Path) -> tuple[str, Path]:
    """Sign ``zone``'s file in ``directory``: (the signed file's name, the DS file)."""
    keygen, signzone = require_binary("ldns-keygen"), require_binary("ldns-signzone")
    key = subprocess.run(
        [keygen, "-a", "ECDSAP256SHA256", "-k", zone.name],
        cwd=directory,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    subprocess.run([signzone, f"{zone.name}.zone", key], cwd=directory, check=True)
    return f"{zone.name}.zone.signed", directory / f"{key}.ds"


NSD_CONF = """\
server:
    ip-address: 127.0.0.1
    port: {port}
    username: ""
    chroot: ""
    zonesdir: "{dir}"
    pidfile: ""
    database: ""
    zonelistfile: "{dir}/zone.list"
    xfrdfile: "{dir}/xfrd.state"
    xfrdir: "{dir}"
    server-count: 1
    verbosity: 1
remote-control:
    control-enable: no
"""

UNBOUND_CONF = """\
server:
    interface: 127.0.0.1
    port: {port}
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 1
    num-threads: 1
    so-reuseport: no
    do-not-query-localhost: no
    qname-minimisation: no
    trust-anchor-file: "{dir}/anchors.ds"
    local-zone: "test." nodefault
stub-zone:
    name: "."
    stub-addr: 127.0.0.1@{nsd_port}
    stub-prime: no
"""


@contextlib.contextmanager
def signed_dns(zones: Sequence[Zone], directory: Path) -> Iterator[SignedDns]:
    """nsd serving ``zones`` (the signed ones signed) and unbound validating them."""
    anchors: list[str] = []
    nsd_conf = NSD_CONF.format(port=free_port(), dir=directory)
    nsd_port = int(nsd_conf.split("port: ")[1].split("\n")[0])
    for zone in zones:
        (directory / f"{zone.name}.zone").write_text(zone_text(zone))
        served = f"{zone.name}.zone"
        if zone.signed:
            served, ds = sign(zone, directory)
            anchors.append(ds.read_text())
            with (directory / served).open("a") as signed:
                signed.writelines(f"{record}\n" for record in zone.bogus)
        nsd_conf += f'zone:\n    name: "{zone.name}"\n    zonefile: "{served}"\n'
    (directory / "anchors.ds").write_text("".join(anchors))
    (directory / "nsd.conf").write_text(nsd_conf)
    unbound_port = free_port()
    unbound_conf = UNBOUND_CONF.format(port=unbound_port, dir=directory, nsd_port=nsd_port)
    unbound_conf += "".join(
        f'stub-zone:\n    name: "{z.name}"\n    stub-addr: 127.0.0.1@{nsd_port}\n' for z in zones
    )
    (directory / "unbound.conf").write_text(unbound_conf)
    nsd = [require_binary("nsd"), "-d", "-c", str(directory / "nsd.conf")]
    unbound = [require_binary("unbound"), "-d", "-c", str(directory / "unbound.conf")]
    with start_process(nsd, nsd_port), start_process(unbound, unbound_port):
        yield SignedDns(f"127.0.0.1:{unbound_port}", f"127.0.0.1:{nsd_port}")


@contextlib.contextmanager
def forwarding_dnsmasq(upstream: str) -> Iterator[str]:
    """dnsmasq forwarding every query to ``upstream`` (``host:port``), AD bits stripped;
    yields its ``host:port``."""
    host, port = upstream.rsplit(":", 1)
    own = free_port()
    argv = [
        require_binary("dnsmasq"),
        "--keep-in-foreground",
        "--no-daemon",
        f"--port={own}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        "--cache-size=0",
        f"--server={host}#{port}",
        "--pid-file=",
        "--log-facility=-",
    ]
    with start_process(argv, own):
        yield f"127.0.0.1:{own}"
