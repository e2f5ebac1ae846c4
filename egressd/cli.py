"""The ``egressd`` command line: check, select, probe, status and run.

Exit codes: 0 success, 1 a failed probe or an unreachable daemon, 2 an invalid configuration
or bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from egressd import __version__
from egressd.config import (
    Config,
    ConfigError,
    Source,
    config_path_from,
    format_hostport,
    load_config,
    load_status_endpoints,
    parse_hostport,
)
from egressd.pools import NoSourcesAvailable, PoolSelector

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2


def build_parser() -> argparse.ArgumentParser:
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="configuration file (default: $EGRESSD_CONFIG, else /etc/egressd/egressd.toml)",
    )
    parser = argparse.ArgumentParser(
        prog="egressd",
        description="Egress layer for mail servers: picks the source address of each "
        "outbound SMTP connection.",
    )
    parser.add_argument("--version", action="version", version=f"egressd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser(
        "check",
        parents=[config_option],
        help="validate the configuration and show sources, pool shares and listeners",
    )

    select = commands.add_parser(
        "select", parents=[config_option], help="print the sources a pool would pick next"
    )
    select.add_argument("pool")
    select.add_argument("-n", type=int, default=10, metavar="N", help="how many (default 10)")

    probe = commands.add_parser(
        "probe",
        parents=[config_option],
        help="dial a server through a source or pool and print its greeting",
    )
    which = probe.add_mutually_exclusive_group(required=True)
    which.add_argument("--source", metavar="NAME")
    which.add_argument("--pool", metavar="NAME")
    probe.add_argument("destination", metavar="HOST[:PORT]")
    probe.add_argument("--json", action="store_true", help="print one JSON object")

    run = commands.add_parser(
        "run", parents=[config_option], help="run the daemon in the foreground"
    )
    run.add_argument("--json-logs", action="store_true", help="log JSON lines (as [log] format)")

    commands.add_parser(
        "status",
        parents=[config_option],
        help="ask the running daemon for each source's health (needs [control] socket)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = config_path_from(args.config, os.environ)
    try:
        config = load_config(path)
    except ConfigError as exc:
        if args.command == "status":
            return status_despite_errors(path, exc)
        for error in exc.errors:
            print(error, file=sys.stderr)
        print(f"egressd: {len(exc.errors)} error(s) in the configuration", file=sys.stderr)
        return EXIT_INVALID
    if args.command == "check":
        return command_check(config, sys.stdout)
    if args.command == "select":
        return command_select(config, args.pool, args.n, sys.stdout)
    if args.command == "probe":
        return command_probe(config, args)
    if args.command == "status":
        from egressd.control import command_status

        return command_status(config, sys.stdout)
    from egressd.daemon import run_daemon

    return run_daemon(config, json_logs=args.json_logs)


def status_despite_errors(path: str, error: ConfigError) -> int:
    """``egressd status`` when the file on disk is invalid (say, after a refused reload).

    The running daemon still serves its previous configuration; only the ``[control]`` and
    ``[metrics]`` addresses are needed to ask it, so those are read alone.
    """
    from egressd.control import command_status

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
        return EXIT_INVALID
    return command_status(endpoints, sys.stdout)


def command_check(config: Config, out: TextIO) -> int:
    print(f"configuration {config.path} is valid", file=out)
    for extra in config.source_files:
        print(f"  sources file {extra}", file=out)
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
        print(f"  {door:<6} {listener.address}{tag}", file=out)
    return EXIT_OK


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


def command_select(config: Config, pool: str, count: int, out: TextIO) -> int:
    if pool not in config.pools:
        print(f'egressd: unknown pool "{pool}"', file=sys.stderr)
        return EXIT_INVALID
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

    try:
        destination = parse_hostport(args.destination, default_port=25)
    except ValueError as exc:
        print(f"egressd: destination {args.destination!r} {exc}", file=sys.stderr)
        return EXIT_INVALID
    explicit_port = args.destination.endswith(f":{destination.port}")
    try:
        result = run_probe(
            config,
            source=args.source,
            pool=args.pool,
            host=destination.host,
            port=destination.port if explicit_port else None,
        )
    except ProbeFailed as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "kind": exc.kind}))
        print(f"egressd: probe failed: {exc}", file=sys.stderr)
        return EXIT_FAILED if exc.kind != "config" else EXIT_INVALID
    if args.json:
        print(json.dumps(result.as_json()))
    else:
        print(f"source          {result.source}")
        print(f"via             {result.via}")
        print(f"local address   {format_hostport(*result.local_address)}")
        print(f"remote address  {format_hostport(*result.remote_address)}")
        print(f"greeting        {result.greeting}")
    return EXIT_OK
