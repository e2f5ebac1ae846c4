"""The test harness's free_port: the ports one test setup asks for never collide."""

from __future__ import annotations

from harness import free_port


def test_free_port_never_hands_out_the_same_port_twice() -> None:
    """The kernel's pick for port 0 repeats itself once the probe is closed (2,000 picks
    from the ephemeral range collide almost surely); a door and the metrics endpoint that
    got the same port failed a daemon's start with "Address already in use"."""
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
