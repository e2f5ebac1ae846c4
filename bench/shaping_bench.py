"""CPU per message through the SMTP door with a 50-provider shaping file, against none.

Run it through ``scripts/bench shaping`` (``--help`` for the knobs)::

    scripts/bench shaping              # 10 KiB, 50 sessions, sink with PIPELINING
    scripts/bench shaping --providers 200 --rounds 5

Issue 13's target: shaping files of 50 providers cost at most 10% more CPU per message than
no shaping, measured in one run. Three contenders sit in front of one ``smtp-sink`` and are
measured in the same alternating rounds (the machine's drift favours none of them), with
Postfix's ``smtp-source`` as the generator, as ``scripts/bench smtp`` does:

* ``direct``: smtp-source straight into the sink (the generator's ceiling);
* ``plain``: egressd with the SMTP door and no shaping file (``scripts/bench smtp``'s egressd);
* ``shaped``: the same egressd with ``shaping_files`` naming a generated KumoMTA file of
  ``--providers`` providers, each with a ``DomainSuffix`` match, an ``MXSuffix`` match, a
  connection limit, message and connection rates, deliveries per connection and three
  automation rules (regexes heard by every reply). The bench's recipient domain belongs to
  the last provider, so matching walks all of them; the limits are set high enough never to
  refuse, so both egressd contenders relay every message and do the same work besides
  shaping: leases, GCRA cells, the per-message budget check, the rules on every reply.

It prints messages/s and egressd's CPU per message (user + system from ``/proc/PID/stat``)
for both, and the extra CPU of shaping in percent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from procs import free_port, running
from smtp_bench import (
    EGRESSD,
    EGRESSD_CONFIG,
    KIB,
    RECIPIENT,
    SOURCE_ADDRESS,
    Case,
    Contender,
    calibrate,
    median,
    median_ms,
    run_once,
    sink_argv,
)

NAMES = ("direct", "plain", "shaped")
SET_CONNECTION_LIMIT = '{ SetConfig = { name = "connection_limit", value = 1 } }'


def shaping_file(providers: int, domain: str) -> str:
    """A KumoMTA shaping file of ``providers`` providers; ``domain`` is the last one's."""
    parts = [
        '["default"]\nconnection_limit = 10000\nmax_deliveries_per_connection = 1000000\n',
        '[["default".automation]]\nregex = "\\\\[TSS04\\\\]"\naction = "Suspend"\n'
        'duration = "1h"\n',
    ]
    for number in range(providers):
        suffix = domain if number == providers - 1 else f"provider{number}.bench"
        parts.append(
            f'[provider."p{number}"]\n'
            f'match = [{{ DomainSuffix = "{suffix}" }}, {{ MXSuffix = ".mx{number}.bench" }}]\n'
            "connection_limit = 5000\n"
            'max_message_rate = "1000000/s"\n'
            'max_connection_rate = "1000000/s"\n'
            'provider_max_message_rate = "1000000/s"\n'
            "max_deliveries_per_connection = 1000000\n"
        )
        for rule, regex in enumerate(
            (
                "\\\\[TS0[1-3]\\\\]",
                "temporarily deferred due to user complaints",
                f"4\\\\.7\\\\.{number} policy p{number}",
            )
        ):
            action = '"Suspend"' if rule != 1 else SET_CONNECTION_LIMIT
            parts.append(
                f'[[provider."p{number}".automation]]\nregex = "{regex}"\n'
                f'action = {action}\nduration = "1h"\n'
            )
    return "\n".join(parts)


@contextlib.contextmanager
def contenders(workdir: Path, providers: int) -> Iterator[list[Contender]]:
    """The sink, and an egressd without and one with the shaping file in front of it."""
    sink_port = free_port()
    domain = RECIPIENT.rpartition("@")[2]
    (workdir / "shaping.toml").write_text(shaping_file(providers, domain))
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(running(sink_argv(sink_port, True), sink_port, workdir, "sink"))
        found = [Contender(sink_port, sink)]
        for name in NAMES[1:]:
            relay_port = free_port()
            config = workdir / f"egressd-{name}.toml"
            text = EGRESSD_CONFIG.format(
                sink_port=sink_port, relay_port=relay_port, source=SOURCE_ADDRESS, workers=1
            )
            if name == "shaped":
                text = f'shaping_files = ["{workdir / "shaping.toml"}"]\n{text}'
            config.write_text(text)
            argv = [*EGRESSD, "run", "-c", str(config)]
            pid = stack.enter_context(running(argv, relay_port, workdir, f"egressd-{name}"))
            found.append(Contender(relay_port, sink, pid))
        yield found


def figures(case: Case, found: list[Contender]) -> dict[str, object]:
    direct, plain, shaped = (contender.runs[case] for contender in found)
    plain_ms, shaped_ms = median_ms(plain, "egressd_cpu"), median_ms(shaped, "egressd_cpu")
    return {
        "case": case.name,
        "direct_msgs_per_s": round(median(direct, "rate"), 1),
        "plain_msgs_per_s": round(median(plain, "rate"), 1),
        "shaped_msgs_per_s": round(median(shaped, "rate"), 1),
        "plain_cpu_ms_per_msg": round(plain_ms, 3),
        "shaped_cpu_ms_per_msg": round(shaped_ms, 3),
        "extra_cpu": round(shaped_ms / plain_ms - 1, 3),
        "per_round_extra_cpu": [
            round(s.per_message_ms(s.egressd_cpu) / p.per_message_ms(p.egressd_cpu) - 1, 3)
            for p, s in zip(plain, shaped, strict=True)
        ],
        "plain_rounds": [round(run.rate, 1) for run in plain],
        "shaped_rounds": [round(run.rate, 1) for run in shaped],
    }


def run(args: argparse.Namespace) -> int:
    case = Case(args.size * KIB, args.sessions, True)
    with (
        tempfile.TemporaryDirectory(prefix="egressd-shaping-bench-") as tmp,
        contenders(Path(tmp), args.providers) as found,
    ):
        for contender in found:
            calibrate("smtp-source", contender, case, args.seconds)
        size = min(c.size_for[case] for c in found[1:])  # the same load for both egressds
        for contender in found[1:]:
            contender.size_for[case] = size
        for number in range(args.rounds):
            print(f"round {number + 1} of {args.rounds}", file=sys.stderr, flush=True)
            order = found if number % 2 == 0 else list(reversed(found))
            for contender in order:
                result = run_once("smtp-source", contender, case, contender.size_for[case])
                contender.runs.setdefault(case, []).append(result)
    row = figures(case, found)
    if args.json:
        print(json.dumps({"providers": args.providers, "cpus": os.cpu_count(), **row}))
        return 0
    print(
        f"SMTP door with a {args.providers}-provider shaping file against none; {case.name};"
        f" generator smtp-source, sink smtp-sink; medians of {args.rounds} alternating rounds."
    )
    print(
        f"direct {row['direct_msgs_per_s']:.0f}/s | no shaping {row['plain_msgs_per_s']:.0f}/s,"
        f" {row['plain_cpu_ms_per_msg']:.3f} ms CPU/msg | shaping"
        f" {row['shaped_msgs_per_s']:.0f}/s, {row['shaped_cpu_ms_per_msg']:.3f} ms CPU/msg"
    )
    extra, per_round = row["extra_cpu"], row["per_round_extra_cpu"]
    assert isinstance(extra, float) and isinstance(per_round, list)
    rounds = ", ".join(f"{value:+.1%}" for value in per_round)
    print(f"extra CPU per message with shaping: {extra:+.1%} (target <= +10%; rounds: {rounds})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench shaping", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--providers", type=int, default=50, help="providers in the file")
    parser.add_argument("--size", type=int, default=10, help="body KiB")
    parser.add_argument("--sessions", type=int, default=50, help="smtp-source sessions")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (median)")
    parser.add_argument("--seconds", type=float, default=2.0, help="about this long per run")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
