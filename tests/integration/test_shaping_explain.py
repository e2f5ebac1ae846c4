"""``egressd explain`` against the real daemon: dnsmasq serves a fake provider's MX, a
provider rule suspends one source, and explain shows the MX, the site, the provider and why,
each limit with its file and section, the suspension, and the next pick (without using it).
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from daemon_helpers import port_of, running_daemon
from prometheus_client.parser import text_string_to_metric_families
from smtp_harness import dnsmasq, send_one, smtp_sink

from egressd.cli import main
from egressd.config import load_config
from egressd.doors.smtp import SmtpDoor
from egressd.explain import command_explain
from egressd.status import scrape

pytestmark = pytest.mark.integration

OPEN = "egressd_provider_open_connections"

TSS04 = "421 4.7.0 [TSS04] Messages from 127.0.0.3 temporarily deferred due to unexpected volume"
SHAPING = r"""
[default]
connection_limit = 7

[provider."bigmail"]
match = [{ MXSuffix = ".bigmail-mx.test" }]
max_deliveries_per_connection = 33

[[provider."bigmail".automation]]
regex = "\\[TSS04\\]"
action = "Suspend"
duration = "1h"
"""


async def test_explain_shows_provider_limits_suspension_and_next_pick(short_dir: Path) -> None:
    (short_dir / "shaping.toml").write_text(SHAPING)
    mx = [("bigmail.test", "mx1.bigmail-mx.test", 10), ("bigmail.test", "mx2.bigmail-mx.test", 20)]
    hosts = {"mx1.bigmail-mx.test": ["127.0.0.1"], "mx2.bigmail-mx.test": ["127.0.0.1"]}
    with (
        smtp_sink(rcpt_replies={"tss@bigmail.test": TSS04}) as sink,
        dnsmasq(mx=mx, hosts=hosts) as dns,
    ):
        text = f"""
shaping_files = ["shaping.toml"]
[dns]
nameservers = ["{dns.nameserver}"]
[access]
deny_destinations = []
[control]
socket = "{short_dir}/c.sock"
[[smtp.listener]]
address = "127.0.0.1:0"
pool = "main"
[source."a"]
source_address = "127.0.0.3"
remote_port = {sink.port}
[source."b"]
source_address = "127.0.0.4"
remote_port = {sink.port}
[pool."main"."a"]
[pool."main"."b"]
"""
        async with running_daemon(text, short_dir, {"smtp": SmtpDoor()}) as daemon:
            port = port_of(daemon, "smtp")
            reply = await trio.to_thread.run_sync(send_one, port, "tss@bigmail.test")
            assert reply.startswith("421"), reply  # source a is now suspended for bigmail
            config = load_config(short_dir / "egressd.toml")

            def explain() -> tuple[int, str]:
                out = io.StringIO()
                code = command_explain(config, "bigmail.test", "main", out)
                return code, out.getvalue()

            selector = daemon.runtime.egress.pools.selector("main")
            turns = [peer.current for peer in selector._peers]
            code, first = await trio.to_thread.run_sync(explain)
            _, second = await trio.to_thread.run_sync(explain)
            assert [peer.current for peer in selector._peers] == turns
        code_alone, alone = await trio.to_thread.run_sync(explain)
    assert code == 0, first
    assert "MX 10 mx1.bigmail-mx.test" in first and "MX 20 mx2.bigmail-mx.test" in first
    assert "site (mx1|mx2).bigmail-mx.test" in first
    assert "provider bigmail: every MX host (mx1.bigmail-mx.test, mx2.bigmail-mx.test)" in first
    limit_lines = [line for line in first.splitlines() if "connection_limit 7  (" in line]
    assert len(limit_lines) == 2 and all("shaping.toml" in line for line in limit_lines)
    deliveries = [line for line in first.splitlines() if "max_deliveries_per_connection 33" in line]
    assert len(deliveries) == 2 and all("bigmail" in line for line in deliveries), deliveries
    assert "suspend on (a, provider bigmail) until" in first
    assert "TSS04" in first
    # a is suspended for bigmail: b is next, and asking twice uses no turn of the pool
    assert "next pick: b" in first and "next pick: b" in second
    assert code_alone == 0
    assert "the daemon was not asked" in alone and "usage and suspensions unknown" in alone
    assert "provider bigmail" in alone


async def test_operator_suspends_a_source_towards_a_provider_only(
    short_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (short_dir / "shaping.toml").write_text(SHAPING)
    mx = [("bigmail.test", "mx1.bigmail-mx.test", 10), ("other.test", "mx.other.test", 10)]
    hosts = {"mx1.bigmail-mx.test": ["127.0.0.1"], "mx.other.test": ["127.0.0.1"]}
    with smtp_sink() as sink, dnsmasq(mx=mx, hosts=hosts) as dns:
        text = f"""
shaping_files = ["shaping.toml"]
[dns]
nameservers = ["{dns.nameserver}"]
[access]
deny_destinations = []
[control]
socket = "{short_dir}/c.sock"
[metrics]
listen = "127.0.0.1:0"
[[smtp.listener]]
address = "127.0.0.1:0"
pool = "main"
[source."a"]
source_address = "127.0.0.3"
remote_port = {sink.port}
[source."b"]
source_address = "127.0.0.4"
remote_port = {sink.port}
[pool."main"."a"]
[pool."main"."b"]
"""
        async with running_daemon(text, short_dir, {"smtp": SmtpDoor()}) as daemon:
            port = port_of(daemon, "smtp")
            path = str(short_dir / "egressd.toml")

            async def cli(*args: str) -> tuple[int, str, str]:
                code = await trio.to_thread.run_sync(main, ["-c", path, *args])
                out, err = capsys.readouterr()
                return code, out, err

            code, out, _ = await cli("suspend", "a", "1h", "--provider", "bigmail")
            assert code == 0 and "a towards provider bigmail suspended for 3600s" in out
            assert (await cli("suspend", "a", "400d", "--provider", "bigmail"))[0] != 0
            code, _, err = await cli("suspend", "a", "1h", "--provider", "nosuch")
            assert code == 1 and "unknown provider 'nosuch'" in err
            code, out, _ = await cli("status")
            assert code == 0
            [row] = [line for line in out.splitlines() if "provider bigmail" in line]
            assert row.split()[:4] == ["a", "provider", "bigmail", "suspend"]
            assert "suspended by operator" in row
            assert "3600.0s" in row or "3599." in row, row
            sent = [
                await trio.to_thread.run_sync(send_one, port, f"x{i}@{domain}")
                for i in range(2)
                for domain in ("bigmail.test", "other.test")
            ]
            assert sent == ["sent"] * 4
            assert daemon.extras is not None and daemon.extras.metrics_port is not None
            endpoint = load_config(path).metrics.listen
            assert endpoint is not None
            metrics_at = replace(endpoint, port=daemon.extras.metrics_port)

            async def metrics() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
                exposition = await trio.to_thread.run_sync(scrape, metrics_at)
                return {
                    (sample.name, tuple(sorted(sample.labels.items()))): sample.value
                    for family in text_string_to_metric_families(exposition)
                    for sample in family.samples
                }

            def by_source_provider(
                samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str
            ) -> dict[tuple[str, str], float]:
                return {
                    (dict(labels)["source"], dict(labels)["provider"]): value
                    for (name, labels), value in samples.items()
                    if name == metric
                }

            samples = await metrics()
            with trio.fail_after(5):  # a remote is closed a moment after the MTA's QUIT
                while sum(by_source_provider(samples, OPEN).values()):
                    await trio.sleep(0.05)
                    samples = await metrics()
            assert by_source_provider(samples, "egressd_provider_connections_total") == {
                ("b", "bigmail"): 2.0,
                ("a", "other"): 1.0,
                ("b", "other"): 1.0,
            }
            messages_by = by_source_provider(samples, "egressd_provider_messages_total")
            assert messages_by == {("b", "bigmail"): 2.0, ("a", "other"): 1.0, ("b", "other"): 1.0}
            active = {
                labels: value
                for (name, labels), value in samples.items()
                if name == "egressd_shaping_active"
            }
            assert active == {(("provider", "bigmail"), ("rule", "suspend"), ("source", "a")): 1.0}
            code, out, _ = await cli("resume", "a", "--provider", "bigmail")
            assert code == 0 and "a towards provider bigmail resumed" in out
            code, out, _ = await cli("status")
            assert "no active shaping suspension or override" in out
            messages = await sink.wait(4)
    by_domain: dict[str, set[str]] = {}
    for message in messages:
        by_domain.setdefault(message.rcpt_tos[0].split("@")[1], set()).add(message.peer)
    assert by_domain == {"bigmail.test": {"127.0.0.4"}, "other.test": {"127.0.0.3", "127.0.0.4"}}
