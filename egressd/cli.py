"""The ``egressd`` command line: check, select, probe, explain, status, suspend, resume,
warmup, run and socks5 (no configuration file).

Exit codes, as ``haproxy -c`` and ``nginx -t`` use them, so a script can tell a bad file
from a bad command line:

* 0: success (``check``: the configuration is valid);
* 1: an invalid configuration, a failed probe, a daemon that cannot be reached or that
  refused the request;
* 2: bad usage (an unknown option, pool or source named on the command line);
* 78 (``EX_CONFIG`` of sysexits.h), from ``run`` only: the configuration is invalid, so
  the daemon did not start. The systemd unit lists it in ``RestartPreventExitStatus=``: a
  restart loop cannot fix a file. ``run`` exits 1 when it failed to start for another
  reason (an address it cannot bind), which a restart may well fix.

``-c FILE`` may stand before or after the subcommand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from egressd import __version__
from egressd.config import (
    Config,
    ConfigError,
    Endpoint,
    Pool,
    PoolEntry,
    Socks5Listener,
    Source,
    config_path_from,
    format_hostport,
    load_config,
    load_status_endpoints,
    parse_duration,
    parse_hostport,
)
from egressd.net.shaping import findings_text, load_policy
from egressd.pools import NoSourcesAvailable, PoolSelector
from egressd.shaping import ShapingPolicy

if TYPE_CHECKING:
    from egressd.probe import MxReport

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78

COMMON_EXITS = "exit status: 0 success, 1 invalid configuration or {failure}, 2 usage error"
CONFIG_HELP = "configuration file (default: $EGRESSD_CONFIG, else /etc/egressd/egressd.toml)"
MAX_REASON = 200
MAIN_EPILOG = """\
-c FILE may stand before or after the command; `egressd COMMAND --help` describes each.

exit status: 0 success, 1 invalid configuration (or the command failed: see its help),
2 usage error; `run` exits 78 (EX_CONFIG) when the configuration is invalid."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs keep their line breaks; defaults are shown."""


class _Version(argparse.Action):
    """``--version``: the version and the build, pure Python or compiled (mypyc); the
    protocol modules it looks at are imported only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("help", "show the version and the build (pure Python or compiled)")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from egressd.buildinfo import build

        print(f"egressd {__version__}, {build()}")
        parser.exit()


def _add_command(
    commands: Any, name: str, summary: str, description: str, failure: str
) -> argparse.ArgumentParser:
    """A subcommand with a description, its exit codes in the epilog, and its own ``-c``.

    The subcommand's ``-c`` defaults to SUPPRESS so it does not overwrite a ``-c`` given
    before the subcommand.
    """
    command: argparse.ArgumentParser = commands.add_parser(
        name,
        help=summary,
        description=description,
        epilog=COMMON_EXITS.format(failure=failure),
        formatter_class=_Formatter,
    )
    command.add_argument(
        "-c", "--config", metavar="FILE", default=argparse.SUPPRESS, help=CONFIG_HELP
    )
    return command


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} {exc}") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return seconds


def _reason(text: str) -> str:
    if not text.strip() or len(text) > MAX_REASON or not text.isprintable():
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_REASON} printable characters")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egressd",
        description="Egress layer for mail servers: picks the source address of each "
        "outbound SMTP connection.",
        epilog=MAIN_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action=_Version)
    parser.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_check(commands)
    _add_select(commands)
    _add_probe(commands)
    _add_run(commands)
    _add_status(commands)
    _add_suspend(commands)
    _add_resume(commands)
    _add_warmup(commands)
    _add_explain(commands)
    _add_socks5(commands)
    return parser


def _add_check(commands: Any) -> None:
    check = _add_command(
        commands,
        "check",
        "validate the configuration and show sources, pool shares and listeners",
        "Validate the configuration (every error names the file and the key path), then show\n"
        "each source, how each pool shares its traffic, and the listeners. Warnings, which do\n"
        "not fail the check, go to stderr: source addresses that are not on this host, sources\n"
        "that share an address, EHLO names whose A/AAAA record does not point back to the\n"
        "source's address (when DNS answers).",
        "-",
    )
    check.epilog = "exit status: 0 valid, 1 invalid, 2 usage error"
    check.add_argument(
        "-q", "--quiet", action="store_true", help="print errors only (for ExecReload and scripts)"
    )
    check.add_argument(
        "--effective",
        action="store_true",
        help="print every setting with its value and, where it differs, its default "
        "(like postconf -n / postconf -d)",
    )


def _add_select(commands: Any) -> None:
    select = _add_command(
        commands,
        "select",
        "print the sources a pool would pick next",
        "Print the next N sources a fresh selector for POOL picks, one per line, to see how a\n"
        "pool's weights rotate. Source health is not taken into account.",
        "an empty pool",
    )
    select.add_argument("pool", metavar="POOL", help="the pool's name")
    select.add_argument("-n", type=int, default=10, metavar="N", help="how many (default 10)")


def _add_probe(commands: Any) -> None:
    probe = _add_command(
        commands,
        "probe",
        "dial a server through a source or pool and print its greeting",
        "Dial HOST[:PORT] through one source, or through a pool's next source, exactly as a\n"
        "front door would, and print the path, the local address the server sees, the remote\n"
        "address and the server's first line. A failure says which kind it was: unplumbed\n"
        "source address, unreachable or refusing proxy, destination refused or timed out.",
        "a failed probe",
    )
    which = probe.add_mutually_exclusive_group(required=True)
    which.add_argument("--source", metavar="NAME", help="dial through this source")
    which.add_argument("--pool", metavar="NAME", help="dial through this pool's next source")
    probe.add_argument(
        "destination",
        metavar="HOST[:PORT] | DOMAIN",
        help="the server to dial (port: the source's remote_port, else 25), or with --mx/--a"
        " a mail domain",
    )
    domain = probe.add_mutually_exclusive_group()
    domain.add_argument(
        "--mx",
        action="store_true",
        help="DOMAIN's MX hosts as the SMTP door finds them ([dns], [smtp.routes]), each"
        " dialed in turn: greeting, EHLO reply and STARTTLS (certificate, verification)",
    )
    domain.add_argument(
        "--a", action="store_true", help="the same with DOMAIN's own A/AAAA records"
    )
    probe.add_argument(
        "--ignore-access",
        action="store_true",
        help="do not apply [access] (destination_ports, deny_destinations) as the front"
        " doors do: for testing against loopback or private addresses",
    )
    probe.add_argument("--json", action="store_true", help="print one JSON object")


def _add_run(commands: Any) -> None:
    run = _add_command(
        commands,
        "run",
        "run the daemon in the foreground",
        "Run the daemon in the foreground, logging to stderr. SIGHUP reloads the\n"
        "configuration (an invalid one is refused and logged; the old one stays); SIGTERM\n"
        "drains sessions for [limits] shutdown_grace and exits 0.",
        "-",
    )
    run.epilog = (
        "exit status: 0 after a clean shutdown, 1 startup failed (an address cannot be\n"
        "bound), 2 usage error, 78 invalid configuration (EX_CONFIG: restarting will not help)"
    )
    run.add_argument("--json-logs", action="store_true", help="log JSON lines (as [log] format)")
    run.add_argument("--worker", type=_worker, default=None, help=argparse.SUPPRESS)


def _worker(text: str) -> tuple[int, int]:
    """``--worker N:FD``: the supervisor starts worker N with its channel on descriptor FD."""
    number, _, fd = text.partition(":")
    try:
        return int(number), int(fd)
    except ValueError:
        raise argparse.ArgumentTypeError("expected NUMBER:FD") from None


def _add_explain(commands: Any) -> None:
    explain = _add_command(
        commands,
        "explain",
        "why mail to a domain leaves from the source it does",
        "Resolve DOMAIN's MX records through [dns] and show the site they make, the shaping\n"
        "provider that matched and why, and each source's effective limits with the file and\n"
        "section each value came from. Then ask the running daemon, through [control] socket,\n"
        "for each budget's current use, the active suspensions and overrides on this\n"
        "destination and the source the pool would pick next (asking uses no turn of the\n"
        "pool). Without a reachable daemon it says so and shows a fresh selector's pick.",
        "an unknown pool or a failed MX lookup",
    )
    explain.add_argument("domain", metavar="DOMAIN", help="the recipient domain")
    explain.add_argument("--pool", metavar="P", help="only this pool (default: every pool)")


def _listen_address(text: str) -> Endpoint:
    try:
        return parse_hostport(text, allow_names=False, allow_zero=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def _add_socks5(commands: Any) -> None:
    quick = _add_command(
        commands,
        "socks5",
        "a SOCKS5 proxy with no configuration file (like KumoProxy's proxy-server)",
        "Serve SOCKS5 on the --listen addresses in the foreground, with no configuration\n"
        "file, as KumoProxy's `proxy-server --listen` does: a BIND of any address of this\n"
        "host picks it as the source of the following CONNECT; without BIND the kernel\n"
        "picks it. Access rules, limits and timeouts are the defaults of egressd.toml.",
        "-",
    )
    quick.epilog = (
        "exit status: 0 after a clean shutdown, 1 startup failed (an address cannot be\n"
        "bound), 2 usage error"
    )
    quick.add_argument(
        "--listen",
        metavar="ADDR:PORT",
        type=_listen_address,
        action="append",
        required=True,
        help="address to listen on (repeatable)",
    )
    quick.add_argument("--json-logs", action="store_true", help="log JSON lines")


def quick_config(listen: Sequence[Endpoint]) -> Config:
    """``egressd socks5``'s configuration: default settings, one source with no address
    (the kernel picks) for CONNECT without BIND, any local address by BIND."""
    return Config(
        path=Path("egressd-socks5-quick-mode"),
        sources={"default": Source(name="default")},
        pools={"default": Pool("default", (PoolEntry("default"),))},
        socks5_listeners=tuple(Socks5Listener(address, "default") for address in listen),
        quick=True,
    )


def _add_status(commands: Any) -> None:
    _add_command(
        commands,
        "status",
        "ask the running daemon for each source's health",
        "Ask the running daemon, through [control] socket, for its generation, pools and each\n"
        "source's health: healthy or suspended, until when and why, active connections,\n"
        "recent failures. Without [control] socket, scrape [metrics] listen instead (which\n"
        "does not know when a suspension ends). Works while the file on disk is invalid.\n"
        '--fleet: every node and worker seen through [state] backend = "redis", with version,\n'
        "config generation (flagged when it differs from this daemon's), last heartbeat and\n"
        "active connections per source, and the fleet-wide suspensions.",
        "a daemon that cannot be reached",
    ).add_argument(
        "--fleet", action="store_true", help="show every member of the fleet (backend redis)"
    )


def _add_suspend(commands: Any) -> None:
    suspend = _add_command(
        commands,
        "suspend",
        "take a source out of rotation for a while (needs [control] socket)",
        "Tell the running daemon, through [control] socket, to suspend SOURCE for DURATION:\n"
        "pools skip it until the time has passed or `egressd resume SOURCE`. Connections in\n"
        "flight are not cut. With --provider or --site, only towards that shaping provider\n"
        "or site (egressd status lists these with their expiry).",
        "a daemon that cannot be reached or refused (unknown source or provider)",
    )
    suspend.add_argument("source", metavar="SOURCE", help="the source's name")
    _add_towards(suspend)
    suspend.add_argument(
        "duration",
        metavar="DURATION",
        type=_duration,
        help='how long, in humantime syntax: "600s", "10m", "1h 30m"',
    )
    suspend.add_argument(
        "--reason",
        metavar="TEXT",
        type=_reason,
        help='shown by egressd status and logged (default "suspended by operator")',
    )


def _add_resume(commands: Any) -> None:
    resume = _add_command(
        commands,
        "resume",
        "put a suspended source back in rotation (needs [control] socket)",
        "Tell the running daemon, through [control] socket, to end SOURCE's suspension now\n"
        "and forget its recent failures.",
        "a daemon that cannot be reached or refused (unknown source)",
    )
    resume.add_argument("source", metavar="SOURCE", help="the source's name")
    _add_towards(resume)


def _add_towards(command: argparse.ArgumentParser) -> None:
    towards = command.add_mutually_exclusive_group()
    towards.add_argument(
        "--provider", metavar="P", type=_name, help="only towards shaping provider P"
    )
    towards.add_argument(
        "--site", metavar="S", type=_name, help="only towards site S (as egressd explain names it)"
    )


def _name(text: str) -> str:
    if not 0 < len(text) <= 253 or not text.isprintable():
        raise argparse.ArgumentTypeError("must be 1 to 253 printable characters")
    return text


def _add_warmup(commands: Any) -> None:
    warmup = _add_command(
        commands,
        "warmup",
        "see and steer IP warm-up (needs [control] socket)",
        "egressd warmup status [SOURCE]         plan, step, today's quota and use, holds, history\n"
        "egressd warmup plan SOURCE             the projected schedule, day by day\n"
        "egressd warmup hold SOURCE [--reason]  keep the step until resumed\n"
        "egressd warmup resume SOURCE           end an operator's hold\n"
        "egressd warmup set-step SOURCE STEP    put the source on STEP (1 is the first day)\n"
        "--provider P limits plan, hold, resume and set-step to one provider.",
        "a daemon that cannot be reached or refused (no such warming source)",
    )
    warmup.add_argument(
        "action", choices=("status", "plan", "hold", "resume", "set-step"), help="what to do"
    )
    warmup.add_argument("source", metavar="SOURCE", nargs="?", help="the source's name")
    warmup.add_argument("step", metavar="STEP", nargs="?", type=int, help="for set-step")
    warmup.add_argument("--provider", metavar="P", help="one provider (default: all)")
    warmup.add_argument("--reason", metavar="TEXT", type=_reason, help="logged with the change")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "socks5":
        from egressd.daemon import run_daemon

        return run_daemon(quick_config(args.listen), json_logs=args.json_logs)
    path = config_path_from(args.config, os.environ)
    try:
        config = load_config(path)
        shaping = load_policy(config) if args.command in ("check", "run") else None
    except ConfigError as exc:
        return _invalid_configuration(args, path, exc)
    return _run_command(args, config, shaping)


def _run_command(
    args: argparse.Namespace, config: Config, shaping: ShapingPolicy | None = None
) -> int:
    if args.command == "check":
        return command_check(config, args, sys.stdout, shaping)
    if args.command == "select":
        return command_select(config, args.pool, args.n, sys.stdout)
    if args.command == "probe":
        return command_probe(config, args)
    if args.command == "explain":
        from egressd.explain import command_explain

        return command_explain(config, args.domain, args.pool, sys.stdout)
    if args.command in CONTROL_COMMANDS:
        return CONTROL_COMMANDS[args.command](config, args)
    if args.worker is None:  # what check refuses, run refuses: 78, not a 454 later
        from egressd.checks import config_errors

        errors = config_errors(config)
        if errors:
            for error in errors:
                print(error, file=sys.stderr)
            print(f"egressd: {len(errors)} error(s) in the configuration", file=sys.stderr)
            return EXIT_CONFIG
    if args.worker is None and config.daemon.workers > 1:
        from egressd.supervisor import run_supervisor

        return run_supervisor(config, json_logs=args.json_logs)
    from egressd.daemon import run_daemon

    return run_daemon(config, json_logs=args.json_logs, worker=args.worker)


def _invalid_configuration(args: argparse.Namespace, path: str, error: ConfigError) -> int:
    """Every error on stderr; the daemon's commands still try the running daemon."""
    if args.command in CONTROL_COMMANDS:
        return _control_despite_errors(args, path, error)
    for message in error.errors:
        print(message, file=sys.stderr)
    print(f"egressd: {len(error.errors)} error(s) in the configuration", file=sys.stderr)
    return EXIT_CONFIG if args.command == "run" else EXIT_FAILED


def _control_despite_errors(args: argparse.Namespace, path: str, error: ConfigError) -> int:
    """``status``, ``suspend``, ``resume`` when the file on disk is invalid (say, after a
    refused reload).

    The running daemon still serves its previous configuration; only the ``[control]`` and
    ``[metrics]`` addresses are needed to ask it, so those are read alone.
    """
    print(
        f"egressd: warning: {path} has {len(error.errors)} error(s) (see egressd check); "
        "asking the daemon anyway",
        file=sys.stderr,
    )
    try:
        endpoints = load_status_endpoints(path)
    except ConfigError as exc:
        for message in exc.errors:
            print(message, file=sys.stderr)
        return EXIT_FAILED
    return CONTROL_COMMANDS[args.command](endpoints, args)


# --------------------------------------------------------------------------- check


def command_check(
    config: Config, args: argparse.Namespace, out: TextIO, shaping: ShapingPolicy | None = None
) -> int:
    """``egressd check``: the summary (or ``--effective`` settings), warnings on stderr.

    The shaping files' warnings (rules that can never apply) and notices (MTA-only keys and
    actions, each once) are printed too; they never fail the check."""
    from egressd.checks import config_errors, config_warnings, effective_settings

    errors = config_errors(config)
    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        print(f"egressd: {len(errors)} error(s) in the configuration", file=sys.stderr)
        return EXIT_FAILED
    if args.quiet:
        return EXIT_OK
    if args.effective:
        for line in effective_settings(config):
            print(line, file=out)
    else:
        print_summary(config, out)
    for warning in config_warnings(config):
        print(f"egressd: warning: {warning}", file=sys.stderr)
    for finding in findings_text(shaping):
        print(f"egressd: shaping {finding}", file=sys.stderr)
    return EXIT_OK


def print_summary(config: Config, out: TextIO) -> None:
    print(f"configuration {config.path} is valid", file=out)
    for extra in config.source_files:
        print(f"  sources file {extra}", file=out)
    for extra in config.shaping_files:
        print(f"  shaping file {extra}", file=out)
    print(f"\nsources ({len(config.sources)}):", file=out)
    for source in config.sources.values():
        print(f"  {source.name}: {describe_source(source)}", file=out)
    print(f"\npools ({len(config.pools)}):", file=out)
    for pool in config.pools.values():
        shares = PoolSelector(pool).shares()
        if not any(shares.values()):
            print(f"  {pool.name}: empty (selecting from it fails temporarily)", file=out)
            continue
        print(f"  {pool.name}:", file=out)
        for entry in pool.entries:
            print(
                f"    {entry.source:<20} weight {entry.weight:<5} {shares[entry.source]:6.2f}%",
                file=out,
            )
    print_listeners(config, out)


def print_listeners(config: Config, out: TextIO) -> None:
    print("\nlisteners:", file=out)
    listeners = [
        *(("socks5", listener) for listener in config.socks5_listeners),
        *(("proxy", listener) for listener in config.proxy_listeners),
        *(("smtp", listener) for listener in config.smtp.listeners),
    ]
    if config.metrics.listen is not None:
        print(f"  metrics {config.metrics.listen}", file=out)
    if not listeners:
        print("  none", file=out)
    for door, listener in listeners:
        tag = f" pool {listener.pool}" if listener.pool else ""
        if isinstance(listener, Socks5Listener) and listener.use_tls:
            tag += " mutual TLS" if listener.tls_required_client_ca else " TLS"
        print(f"  {door:<6} {listener.address}{tag}", file=out)


def describe_source(source: Source) -> str:
    parts = [f"via {source.hop}"]
    if source.source_address is not None:
        parts.append(f"bind {source.source_address}")
    if source.hop == "haproxy":
        parts.append(f"haproxy {source.ha_proxy_server} as {source.ha_proxy_source_address}")
    if source.hop == "socks5":
        as_address = source.socks5_proxy_source_address
        parts.append(
            f"socks5 {source.socks5_proxy_server}" + (f" as {as_address}" if as_address else "")
        )
    if source.ehlo_domain:
        parts.append(f"ehlo {source.ehlo_domain}")
    if source.remote_port:
        parts.append(f"port {source.remote_port}")
    return ", ".join(parts)


# --------------------------------------------------------------------------- select, probe


def command_select(config: Config, pool: str, count: int, out: TextIO) -> int:
    if pool not in config.pools:
        print(f'egressd: unknown pool "{pool}"', file=sys.stderr)
        return EXIT_USAGE
    selector = PoolSelector(config.pools[pool])
    try:
        for name in selector.take(count):
            print(name, file=out)
    except NoSourcesAvailable as exc:
        print(f"egressd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def command_probe(config: Config, args: argparse.Namespace) -> int:
    from egressd.probe import ProbeFailed, run_probe

    if args.mx or args.a:
        return command_probe_domain(config, args)
    try:
        destination = parse_hostport(args.destination, default_port=25)
    except ValueError as exc:
        print(f"egressd: destination {args.destination!r} {exc}", file=sys.stderr)
        return EXIT_USAGE
    explicit_port = args.destination.endswith(f":{destination.port}")
    try:
        result = run_probe(
            config,
            source=args.source,
            pool=args.pool,
            host=destination.host,
            port=destination.port if explicit_port else None,
            check_access=not args.ignore_access,
        )
    except ProbeFailed as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "kind": exc.kind}))
        print(f"egressd: probe failed: {exc}", file=sys.stderr)
        return EXIT_FAILED if exc.kind != "config" else EXIT_USAGE
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        print(f"source          {result.source}")
        print(f"via             {result.via}")
        print(f"local address   {format_hostport(*result.local_address)}")
        print(f"remote address  {format_hostport(*result.remote_address)}")
        print(f"greeting        {result.greeting}")
    return EXIT_OK


def command_probe_domain(config: Config, args: argparse.Namespace) -> int:
    """``probe --mx/--a DOMAIN``: every mail host; 0 when at least one was reached."""
    from egressd.probe import ProbeFailed, run_domain_probe

    try:
        reports = run_domain_probe(
            config,
            source=args.source,
            pool=args.pool,
            domain=args.destination,
            use_mx=args.mx,
            check_access=not args.ignore_access,
        )
    except ProbeFailed as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "kind": exc.kind}))
        print(f"egressd: probe failed: {exc}", file=sys.stderr)
        return EXIT_FAILED if exc.kind != "config" else EXIT_USAGE
    if args.json:
        print(json.dumps({"domain": args.destination, "hosts": [r.as_json() for r in reports]}))
    for report in reports:
        if not args.json:
            print_mx_report(report)
        if report.result is None:
            print(f"egressd: {report.host}: {report.error}", file=sys.stderr)
    return EXIT_OK if any(report.result is not None for report in reports) else EXIT_FAILED


def print_mx_report(report: MxReport) -> None:
    print(f"mx              {report.host} (preference {report.preference})")
    result = report.result
    if result is None:
        print(f"failed          {report.kind}: {report.error}\n")
        return
    print(f"source          {result.source}")
    print(f"via             {result.via}")
    print(f"local address   {format_hostport(*result.local_address)}")
    print(f"remote address  {format_hostport(*result.remote_address)}")
    print(f"greeting        {result.greeting}")
    for index, line in enumerate(report.ehlo):
        print(f"{'ehlo' if index == 0 else '':<16}{line}")
    if report.tls is not None:
        print(f"starttls        {report.tls.describe()}")
    print()


# --------------------------------------------------------------------------- control socket


def command_status(config: Config, args: argparse.Namespace) -> int:
    from egressd.status import command_status as status

    return status(config, sys.stdout, fleet=getattr(args, "fleet", False))


def command_suspend(config: Config, args: argparse.Namespace) -> int:
    """``egressd suspend SOURCE DURATION [--reason TEXT] [--provider P | --site S]``."""
    request: dict[str, Any] = {
        "command": "suspend",
        "source": args.source,
        "seconds": args.duration,
    }
    if args.reason is not None:
        request["reason"] = args.reason
    request.update(_towards_request(args))
    reply = _ask_daemon(config, request)
    if reply is None:
        return EXIT_FAILED
    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() + args.duration))
    print(f"{args.source}{_towards_text(args)} suspended for {args.duration:g}s, until {until}")
    return EXIT_OK


def _towards_request(args: argparse.Namespace) -> dict[str, str]:
    return {key: getattr(args, key) for key in ("provider", "site") if getattr(args, key)}


def _towards_text(args: argparse.Namespace) -> str:
    return "".join(f" towards {key} {value}" for key, value in _towards_request(args).items())


def command_resume(config: Config, args: argparse.Namespace) -> int:
    """``egressd resume SOURCE [--provider P | --site S]``."""
    request = {"command": "resume", "source": args.source, **_towards_request(args)}
    reply = _ask_daemon(config, request)
    if reply is None:
        return EXIT_FAILED
    state = "resumed" if reply.get("was_suspended") else "was not suspended"
    print(f"{args.source}{_towards_text(args)} {state}")
    return EXIT_OK


def _ask_daemon(config: Config, request: dict[str, Any]) -> dict[str, Any] | None:
    """The daemon's reply when it accepted ``request``; else None, the reason on stderr."""
    from egressd.status import ControlError, ask

    if config.control.socket is None:
        print(
            f"egressd: [control] socket is not set in {config.path}; {request['command']} needs it",
            file=sys.stderr,
        )
        return None
    try:
        reply = ask(config.control.socket, request)
    except ControlError as exc:
        print(f"egressd: {exc}", file=sys.stderr)
        return None
    if not reply.get("ok"):
        print(f"egressd: the daemon refused: {reply.get('error')}", file=sys.stderr)
        return None
    return reply


def command_warmup(config: Config, args: argparse.Namespace) -> int:
    """``egressd warmup ACTION [SOURCE] [STEP] [--provider P] [--reason TEXT]``."""
    from egressd.status import format_warmup

    if args.action != "status" and args.source is None:
        print(f"egressd: warmup {args.action} needs a SOURCE", file=sys.stderr)
        return EXIT_USAGE
    if (args.action == "set-step") != (args.step is not None):
        print("egressd: STEP goes with set-step, and only with it", file=sys.stderr)
        return EXIT_USAGE
    request: dict[str, Any] = {"command": "warmup", "action": args.action}
    for key in ("source", "step", "provider", "reason"):
        if getattr(args, key) is not None:
            request[key] = getattr(args, key)
    reply = _ask_daemon(config, request)
    if reply is None:
        return EXIT_FAILED
    print(format_warmup(reply["warmup"]), end="")
    return EXIT_OK


CONTROL_COMMANDS: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "status": command_status,
    "suspend": command_suspend,
    "resume": command_resume,
    "warmup": command_warmup,
}
