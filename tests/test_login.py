"""The login brake (egressd.login) on an injected clock."""

from __future__ import annotations

from egressd.login import FORGET_AFTER, MAX_DELAY, LoginThrottle, password_matches


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_delay_grows_by_a_second_per_failure_up_to_the_cap() -> None:
    throttle = LoginThrottle(Clock())
    delays = [throttle.failed("192.0.2.1") for _ in range(12)]
    assert delays[:4] == [1.0, 2.0, 3.0, 4.0]
    assert delays[-1] == MAX_DELAY == 10.0
    assert throttle.failed("192.0.2.2") == 1.0  # per address


def test_an_address_is_forgotten_a_while_after_its_last_failure() -> None:
    clock = Clock()
    throttle = LoginThrottle(clock)
    throttle.failed("192.0.2.1")
    clock.now += FORGET_AFTER - 1
    assert throttle.failed("192.0.2.1") == 2.0  # still remembered
    clock.now += FORGET_AFTER + 1
    assert throttle.recent_failures("192.0.2.1") == 0
    assert throttle.failed("192.0.2.1") == 1.0


def test_passwords_match_only_for_a_known_user_with_the_same_password() -> None:
    assert password_matches("s3cret", "s3cret")
    assert not password_matches("s3cret", "s3cre")
    assert not password_matches("s3cret", "")
    assert not password_matches(None, "")
    assert not password_matches(None, "\0" * 32)  # the dummy compared for unknown users
    assert not password_matches("s3cret", b"\xff\xfe".decode("utf-8", "surrogateescape"))
