"""CPU per SMTP transaction in the sans-IO machines alone: no sockets, no trio, no noise.

Run it through ``scripts/bench machines [--size BYTES] [--transactions N]``. The server
machine parses MAIL, RCPT and DATA as smtp-source sends them, answers each, and takes an
80-column body in 64 KiB reads up to the final dot; the client machine sends MAIL, RCPT and
DATA (pipelined), the body and the dot, and parses the four replies. "relay" is the whole
sans-IO half of one message as the SMTP door drives it: the server machine's events fed to
the relay core (:class:`~egressd.relay.core.RelayCore`, on a kept remote connection), its
commands executed on the server machine (replies to the MTA) and the client machine
(commands to the remote, whose replies are canned bytes). Each is timed with
the process's CPU clock over ``--transactions`` transactions, the best of five runs, so it
stays comparable on a busy machine where the end-to-end figures of ``scripts/bench smtp``
drift. With ``--baseline DIR`` the same is measured for the egressd in checkout ``DIR``
(in a child process) and printed alongside. With ``--compiled`` the measured egressd is this
checkout's mypyc-compiled build (``scripts/compiled``), against its pure Python unless
``--baseline`` names another (call counts then leave out the compiled functions, which
cProfile does not see).
"""

from __future__ import annotations

import argparse
import cProfile
import ipaddress
import json
import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

from egressd.config import Config, Pool, PoolEntry, Source
from egressd.net.mx import MxHost, NextHop
from egressd.proto.smtp_client import SmtpClient
from egressd.proto.smtp_common import (
    NEED_DATA,
    Data,
    DataChunk,
    Ehlo,
    EndOfData,
    Mail,
    Rcpt,
    Reply,
)
from egressd.proto.smtp_server import SmtpServer
from egressd.relay.core import RelayCore
from egressd.relay.events import (
    MtaCommand,
    MtaEndOfData,
    NextHopResolved,
    OpenRemote,
    Remote,
    RemoteOpened,
    RemoteReplied,
    ReplyMta,
    ResolveNextHop,
    SendRemote,
)

OK = Reply.make(250, "Ok", enhanced="2.1.0")
GO_AHEAD = Reply(354, ("End data with <CR><LF>.<CR><LF>",))
READ = 65536


def body_of(size: int) -> bytes:
    line = b"X" * 78 + b"\r\n"
    return b"From: <a@b.c>\r\nTo: <d@e.f>\r\n\r\n" + line * (size // len(line))


def ready_server() -> SmtpServer:
    server = SmtpServer()
    server.send(Reply(220, ("relay.bench",)))
    server.receive_data(b"EHLO client.bench\r\n")
    server.next_event()
    server.send(server.ehlo_reply("relay.bench"))
    return server


def server_transaction(server: SmtpServer, wire: bytes) -> None:
    for command in (b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<d@e.f>\r\n", b"DATA\r\n"):
        server.receive_data(command)
        server.send(GO_AHEAD if isinstance(server.next_event(), Data) else OK)
    for start in range(0, len(wire), READ):
        server.receive_data(wire[start : start + READ])
        while (event := server.next_event()) is not NEED_DATA:
            if not isinstance(event, DataChunk):
                server.send(OK)
                return
    raise AssertionError("the body did not end")


def ready_client() -> SmtpClient:
    client = SmtpClient()
    client.receive_data(b"220 mx.bench\r\n")
    client.next_event()
    client.send(Ehlo("out.bench"))
    client.receive_data(b"250-mx.bench\r\n250-PIPELINING\r\n250 SIZE 100000000\r\n")
    client.next_event()
    return client


def client_transaction(client: SmtpClient, body: bytes) -> None:
    client.send(Mail("a@b.c"))
    client.send(Rcpt("d@e.f"))
    client.receive_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    client.next_event()
    client.next_event()
    client.send(Data())
    client.receive_data(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    client.next_event()
    client.send(DataChunk(body))
    client.send(EndOfData())
    client.receive_data(b"250 2.0.0 Ok: queued as 12345\r\n")
    client.next_event()


# --------------------------------------------------------------------------- the relay core

SOURCE = Source("bench", source_address=ipaddress.ip_address("127.0.0.3"), ehlo_domain="out")
MX = NextHop("e.f", "mx", (MxHost("mx.e.f", 10, (ipaddress.ip_address("127.0.0.1"),)),))
#: The remote's replies to what the core sends, by the SendRemote's ``what``.
REMOTE_SAYS = {
    "MAIL FROM and RCPT TO": b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
    "DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    "end of data": b"250 2.0.0 Ok: queued as 12345\r\n",
}


class Healthy:
    def is_suspended(self, name: str) -> bool:
        return False


class World:
    """What the core reads at each MAIL: one source in one pool, no shaping, all healthy."""

    config = Config(
        path=Path("bench.toml"),
        sources={"bench": SOURCE},
        pools={"bench": Pool("bench", (PoolEntry("bench"),))},
    )
    health = Healthy()


class Door:
    """The SMTP door's loop without I/O: events to the core, its commands to the machines."""

    def __init__(self) -> None:
        self.server = ready_server()
        self.client = ready_client()
        world = World()
        self.core = RelayCore("relay.bench", "bench", lambda: world)
        self.to_mta: list[bytes] = []

    def feed(self, event: Any) -> None:
        commands = deque(self.core.handle(event))
        while commands:
            command = commands.popleft()
            result: Any = None
            if isinstance(command, ReplyMta):
                self.to_mta.append(self.server.send(command.reply))
            elif isinstance(command, SendRemote):
                b"".join([self.client.send(c) for c in command.commands])
                self.client.receive_data(REMOTE_SAYS[command.what])
                got = [self.client.next_event() for _ in range(command.replies_owed)]
                result = RemoteReplied(tuple(got))
            elif isinstance(command, ResolveNextHop):
                result = NextHopResolved(MX)
            elif isinstance(command, OpenRemote):
                result = RemoteOpened(remote())
            if result is not None:
                commands.extend(self.core.handle(result))

    def transaction(self, wire: bytes) -> None:
        """One message from the MTA's MAIL to the remote's reply to the final dot."""
        server = self.server
        for line in (b"MAIL FROM:<a@b.c>\r\n", b"RCPT TO:<d@e.f>\r\n", b"DATA\r\n"):
            server.receive_data(line)
            self.feed(MtaCommand(server.next_event()))
        chunks = []
        for start in range(0, len(wire), READ):
            server.receive_data(wire[start : start + READ])
            while (event := server.next_event()) is not NEED_DATA:
                if not isinstance(event, DataChunk):
                    self.feed(MtaEndOfData(tuple(chunks)))
                    self.to_mta.clear()
                    return
                chunks.append(event)
        raise AssertionError("the body did not end")


def remote() -> Remote:
    return Remote(
        source=SOURCE,
        next_hop=MX,
        next_hop_address=(ipaddress.ip_address("127.0.0.1"), 25),
        remote_text="mx.e.f[127.0.0.1]:25",
        describe='source "bench" (127.0.0.3) to mx.e.f[127.0.0.1]:25',
        extensions={"PIPELINING": "", "SIZE": "100000000"},
    )


def best_microseconds(run: object, transactions: int) -> float:
    assert callable(run)
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(transactions):
            run()
        best = min(best, time.process_time() - started)
    return best / transactions * 1e6


def measure(size: int, transactions: int) -> dict[str, float]:
    body = body_of(size)
    server, client = ready_server(), ready_client()
    wire = body + b".\r\n"
    door = Door()
    door.transaction(wire)  # opens the remote connection; the measured ones reuse it
    return {
        "server_us": best_microseconds(lambda: server_transaction(server, wire), transactions),
        "client_us": best_microseconds(lambda: client_transaction(client, body), transactions),
        "relay_us": best_microseconds(lambda: door.transaction(wire), transactions),
        "relay_calls": calls_per_transaction(door, wire),
    }


def calls_per_transaction(door: Door, wire: bytes, transactions: int = 200) -> float:
    """Function calls (Python and built-in, as cProfile counts them) per "relay"
    transaction: egressd's, not the harness's own (its functions and the built-ins it calls).

    Counted by code object from the profiler's own entries, not through :mod:`pstats`,
    which keys functions by file, line and name: every ``__init__`` a dataclass generates
    is ``<string>:2 __init__`` there, so all but one of them went uncounted."""
    profile = cProfile.Profile()
    profile.runcall(lambda: [door.transaction(wire) for _ in range(transactions)])
    harness = __file__
    calls = 0
    for entry in profile.getstats():
        code = entry.code
        if isinstance(code, str):  # a built-in: counted below, by its callers
            continue
        if code.co_filename == harness:
            continue
        calls += entry.callcount
        for sub in entry.calls or ():
            if isinstance(sub.code, str):
                calls += sub.callcount
    return calls / transactions


def measured_in(root: Path, sizes: list[int], transactions: int) -> dict[str, dict[str, float]]:
    """The figures of the egressd imported from ``root``, measured in a child process."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--json"]
    argv += ["--transactions", str(transactions)]
    argv += [item for size in sizes for item in ("--size", str(size))]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONSAFEPATH": "1"}
    done = subprocess.run(argv, capture_output=True, check=True, env=env)
    figures: dict[str, dict[str, float]] = json.loads(done.stdout)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench machines", description=__doc__)
    parser.add_argument("--size", type=int, action="append", help="body bytes (1, 10, 100 KiB)")
    parser.add_argument("--transactions", type=int, default=2000)
    parser.add_argument("--baseline", metavar="DIR", help="also measure egressd from DIR")
    parser.add_argument(
        "--compiled", action="store_true", help="measure the mypyc-compiled build (against pure)"
    )
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = args.size or [1024, 10240, 102400]
    if args.json:
        print(json.dumps({size: measure(size, args.transactions) for size in sizes}))
        return 0
    if args.compiled:
        import procs

        results = measured_in(procs.compiled_build(), sizes, args.transactions)
        args.baseline = args.baseline or str(procs.ROOT)
    else:
        results = {str(size): measure(size, args.transactions) for size in sizes}
    baseline: dict[str, dict[str, float]] = {}
    if args.baseline:
        baseline = measured_in(Path(args.baseline).resolve(), sizes, args.transactions)
    print("CPU per transaction in the SMTP machines (best of 5, process CPU clock)")
    if args.compiled:
        print(f"compiled by mypyc, against the pure Python of {args.baseline}")
    for size, figures in results.items():
        line = f"{size:>7} B body: {_figures(figures)}"
        before = baseline.get(str(size))
        if before:
            line += f"   baseline: {_figures(before)}"
        print(line)
    return 0


def _figures(figures: dict[str, float]) -> str:
    text = f"server {figures['server_us']:6.1f} us, client {figures['client_us']:5.1f} us"
    if "relay_us" in figures:  # a baseline from before the relay column has none
        text += f", relay {figures['relay_us']:6.1f} us ({figures['relay_calls']:.0f} calls)"
    return text


if __name__ == "__main__":
    sys.exit(main())
