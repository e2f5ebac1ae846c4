"""Socket activation's environment: sockets meant for another process are not taken, and the
variables never reach a child. (Inherited sockets themselves: tests/integration/
test_socket_activation.py, through a launcher that does what systemd does.)"""

from __future__ import annotations

import os

from egressd.config import Endpoint
from egressd.net import activation


def test_sockets_meant_for_another_process_are_left_and_the_variables_removed() -> None:
    environ = {"LISTEN_FDS": "2", "LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDNAMES": "a:b"}
    activation.inherit([Endpoint("127.0.0.1", 2525)], environ)
    assert environ == {}  # a worker or a child never sees them
    assert activation.inherited() == []
    assert activation.take(Endpoint("127.0.0.1", 2525)) is None


def test_a_listener_on_port_zero_or_a_name_never_takes_a_socket() -> None:
    assert activation.take(Endpoint("127.0.0.1", 0)) is None
    assert activation.take(Endpoint("localhost", 25)) is None
