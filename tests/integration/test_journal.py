"""The real daemon under journald's stream: every line carries its sd-daemon priority.

``JOURNAL_STREAM`` names the daemon's stderr (a file here), as systemd sets it; what
``journalctl -p warning`` would show is then the lines starting ``<0>`` to ``<4>``.
"""

from __future__ import annotations

import re
from pathlib import Path

import trio
from service_harness import daemon_process

from egressd.status import ask


def warnings_and_worse(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.match(r"<[0-4]>", line)]


async def test_suspensions_and_refused_reloads_are_warnings_under_journald(
    short_dir: Path,
) -> None:
    config = short_dir / "egressd.toml"
    config.write_text(
        '[source.a]\nsource_address = "127.0.0.2"\n[pool.p.a]\n'
        f'[control]\nsocket = "{short_dir}/c.sock"\n'
    )
    async with daemon_process(config, journal=True) as daemon:
        with trio.fail_after(20):
            request = {"command": "suspend", "source": "a", "seconds": 60, "reason": "test"}
            reply = await trio.to_thread.run_sync(ask, f"{short_dir}/c.sock", request)
            assert reply == {"ok": True}
            config.write_text(config.read_text() + "[limits]\nmax_connections = -1\n")
            await daemon.reload()
        log = daemon.log()
    lines = log.splitlines()
    assert all(re.match(r"<[3467]>(info|warning|error|debug) egressd\.", line) for line in lines)
    assert any(line.startswith("<6>info egressd.daemon: egressd ready") for line in lines)
    serious = warnings_and_worse(log)
    assert re.match(r"<4>warning egressd\.[a-z.]+: source suspended by operator", serious[0])
    assert "reason=test" in serious[0]
    assert serious[1].startswith("<3>error egressd.daemon: reload refused: ")
    assert "max_connections" in serious[1]
    assert serious[2].startswith("<3>error egressd.daemon: reload failed")
