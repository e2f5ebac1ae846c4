"""``egressd warmup status|plan|hold|resume|set-step`` against a running daemon."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import trio
from daemon_helpers import port_of, running_daemon
from service_harness import sample, scrape
from smtp_harness import smtp_sink
from test_warmup_smtp import send

from egressd.doors.smtp import SmtpDoor

pytestmark = pytest.mark.integration


def config(port: int, directory: Path) -> str:
    return f"""
[access]
deny_destinations = []
[metrics]
listen = "127.0.0.1:0"
[control]
socket = "{directory / "control.sock"}"
[[smtp.listener]]
address = "127.0.0.1:0"
pool = "main"
[smtp.routes]
"*" = "127.0.0.1:{port}"
[state]
directory = "{directory / "state"}"
[warmup]
timezone = "Europe/Paris"
[warmup.plan.test]
days = [3, 6, 12]
[source."cold"]
source_address = "127.0.0.3"
remote_port = {port}
warmup = "test"
[source."warm"]
source_address = "127.0.0.4"
remote_port = {port}
[pool."main"."cold"]
[pool."main"."warm"]
"""


async def egressd(directory: Path, *args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "egressd", "warmup", *args, "-c", str(directory / "egressd.toml")],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_an_operator_sees_and_steers_the_warm_up(short_dir: Path) -> None:
    with smtp_sink() as sink:
        text = config(sink.port, short_dir)
        async with running_daemon(text, short_dir, {"smtp": SmtpDoor()}) as daemon:
            await send(port_of(daemon, "smtp"), 4)
            code, out, _ = await egressd(short_dir, "status")
            assert code == 0, out
            assert "(Europe/Paris)" in out
            row = next(line for line in out.splitlines() if line.split()[:2] == ["cold", "other"])
            assert row.split()[2:5] == ["test", "1/3", "2/3"]  # 1:1 with warm: 2 of 4 sent

            assert daemon.extras is not None and daemon.extras.metrics_port is not None
            exposition = await scrape(daemon.extras.metrics_port)
            labels = {"source": "cold", "provider": "other"}
            assert sample(exposition, "egressd_warmup_step", **labels) == 1
            assert sample(exposition, "egressd_warmup_quota", **labels) == 3
            assert sample(exposition, "egressd_warmup_used", **labels) == 2
            assert (
                sample(exposition, "egressd_warmup_step", source="warm", provider="other") is None
            )

            code, out, _ = await egressd(short_dir, "hold", "cold", "--reason", "abuse desk")
            assert code == 0 and "abuse desk" in out
            code, out, _ = await egressd(short_dir, "status", "cold")
            held = [line for line in out.splitlines() if line.startswith("cold ")]
            assert held and all(line.endswith("abuse desk") for line in held)
            assert daemon.warming is not None
            quota = daemon.warming.engine.quota("cold", "other")
            assert quota is not None and quota.hold == "abuse desk"

            code, out, _ = await egressd(short_dir, "resume", "cold")
            assert code == 0
            code, out, _ = await egressd(short_dir, "set-step", "cold", "2", "--provider", "other")
            assert code == 0
            quota = daemon.warming.engine.quota("cold", "other")
            assert quota is not None and (quota.step, quota.hold) == (1, None)

            code, out, _ = await egressd(short_dir, "plan", "cold")
            assert code == 0
            assert [line.split()[1] for line in out.splitlines()[1:]] == ["2", "3"]

            code, _, err = await egressd(short_dir, "hold", "warm")
            assert code == 1 and "follows no warm-up plan" in err
            code, _, err = await egressd(short_dir, "set-step", "cold")
            assert code == 2
