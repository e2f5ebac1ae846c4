"""The outbound plan as a transcript: steps out, outcomes in, on a fake clock, no sockets."""

from __future__ import annotations

import ipaddress
import logging

import pytest
from fake_clock import FakeClock

from egressd.config import (
    AccessSettings,
    Config,
    DialSettings,
    Endpoint,
    HealthSettings,
    LimitSettings,
    Pool,
    PoolEntry,
    Source,
    SuspendPolicy,
)
from egressd.egress import (
    Attempt,
    Destination,
    DestinationBreaker,
    Egress,
    EgressFailure,
    EgressObserver,
    Failure,
    GiveUp,
    Party,
    Plan,
    Resolve,
    Stage,
    Step,
    blame,
)
from egressd.egress.failures import timeout_kind
from egressd.health import FailureKind, SourceHealth
from egressd.pools import PoolSet

ip = ipaddress.ip_address
DEAD = (ip("192.0.2.66"), 25)
LIVE = (ip("192.0.2.1"), 25)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_egress(
    clock: FakeClock,
    *sources: Source,
    pools: dict[str, tuple[str, ...]] | None = None,
    cap: int = 2000,
    health: HealthSettings | None = None,
) -> Egress:
    by_name = {s.name: s for s in sources}
    pool_names = pools if pools is not None else {"p": tuple(by_name)}
    config = Config(
        path=None,  # type: ignore[arg-type]
        sources=by_name,
        pools={
            name: Pool(name, tuple(PoolEntry(n) for n in members))
            for name, members in pool_names.items()
        },
        limits=LimitSettings(max_connections_per_source=cap),
        dial=DialSettings(timeout=30.0),
        health=health or HealthSettings(),
    )
    return Egress(
        config,
        PoolSet.from_config(config),
        SourceHealth(by_name, now=clock),
        breaker=DestinationBreaker(now=clock),
    )


def v4(name: str, address: str = "127.0.0.2", **keys: object) -> Source:
    return Source(name=name, source_address=ip(address), **keys)  # type: ignore[arg-type]


def attempt(step: Step) -> Attempt:
    assert isinstance(step, Attempt), step
    return step


def give_up(step: Step) -> EgressFailure:
    assert isinstance(step, GiveUp), step
    return step.failure


def refused(step: Attempt) -> EgressFailure:
    return EgressFailure(
        Failure.REFUSED,
        f"connecting to {step.address[0]}:{step.port} failed: Connection refused",
        source=step.source.name,
        stage=Stage.CONNECT,
        address=step.address,
    )


def unplumbed(step: Attempt) -> EgressFailure:
    return EgressFailure(
        Failure.UNPLUMBED,
        f"source {step.source.name!r}: cannot bind - not configured on this host",
        source=step.source.name,
        stage=Stage.CONNECT,
        address=step.address,
    )


# --------------------------------------------------------------------------- the happy path


def test_a_literal_goes_straight_to_an_attempt_from_the_pools_next_source(
    clock: FakeClock,
) -> None:
    egress = make_egress(clock, v4("a"), v4("b", "127.0.0.3"))
    plans = [Plan(egress, pool="p", host="192.0.2.1", port=25) for _ in range(3)]
    steps = [attempt(plan.next_step()) for plan in plans]
    assert [s.source.name for s in steps] == ["a", "b", "a"]  # smooth WRR, 1:1
    assert steps[0].address == LIVE
    assert steps[0].destination == Destination(ip("192.0.2.1"), 25)
    assert plans[0].progress.stage is Stage.CONNECT
    plans[0].succeeded()
    assert egress.breaker.check(LIVE) is None


def test_an_ip_address_object_is_taken_as_is(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"))
    step = attempt(Plan(egress, pool="p", host=ip("192.0.2.1"), port=587).next_step())
    assert step.address == (ip("192.0.2.1"), 587)


def test_remote_port_wins_and_25_is_the_default(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a", remote_port=2525), v4("b", "127.0.0.3"))
    first = attempt(Plan(egress, pool="p", host="192.0.2.1", port=587).next_step())
    second = attempt(Plan(egress, pool="p", host="192.0.2.1").next_step())
    assert (first.source.name, first.port) == ("a", 2525)
    assert (second.source.name, second.port) == ("b", 25)


def test_a_name_is_resolved_per_source_and_only_its_family_is_tried(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"))
    plan = Plan(egress, pool="p", host="mx.test", port=25)
    step = plan.next_step()
    assert isinstance(step, Resolve)
    assert (step.source.name, step.host, step.port, step.version) == ("a", "mx.test", 25, 4)
    assert plan.progress.stage is Stage.RESOLVE
    plan.resolved(
        [
            Destination(ip("2001:db8::1"), 25, "mx.test"),
            Destination(ip("192.0.2.1"), 25, "mx.test"),
            Destination(ip("192.0.2.2"), 25, "mx.test"),
        ]
    )
    first = attempt(plan.next_step())
    assert first.address == LIVE
    plan.failed(refused(first))
    second = attempt(plan.next_step())
    assert second.address == (ip("192.0.2.2"), 25)


def test_a_plan_without_a_host_asks_the_callers_resolver(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"))
    plan = Plan(egress, pool="p")
    step = plan.next_step()
    assert isinstance(step, Resolve) and step.host is None
    plan.resolved([Destination(ip("192.0.2.1"), 2525, "mx.example")])
    assert attempt(plan.next_step()).address == (ip("192.0.2.1"), 2525)


# --------------------------------------------------------------------------- one retry policy


def test_every_address_fails_then_one_failure_names_them_all(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"), v4("b", "127.0.0.3"))
    plan = Plan(egress, pool="p", host="mx.test", port=25)
    assert isinstance(plan.next_step(), Resolve)
    plan.resolved([Destination(ip("192.0.2.1"), 25), Destination(ip("192.0.2.2"), 25)])
    for _ in range(2):
        plan.failed(refused(attempt(plan.next_step())))
    failure = give_up(plan.next_step())
    assert failure.kind is Failure.REFUSED
    assert str(failure).startswith("all 2 addresses of mx.test failed: ")
    assert "192.0.2.1" in str(failure) and "192.0.2.2" in str(failure)
    assert plan.tried == ["a"]  # another source would meet the same destination


def test_one_address_failing_gives_up_with_its_own_failure(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"))
    plan = Plan(egress, pool="p", host="192.0.2.1", port=25)
    failure = refused(attempt(plan.next_step()))
    plan.failed(failure)
    assert give_up(plan.next_step()) is failure
    assert give_up(plan.next_step()) is failure  # it stays given up


def test_a_source_fault_moves_on_to_the_pools_next_source_once(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="egressd")
    suspended: list[tuple[str, FailureKind]] = []
    egress = make_egress(
        clock, v4("gone", "203.0.113.7"), v4("b", "127.0.0.3"), v4("c", "127.0.0.4")
    )
    egress.observer = EgressObserver(suspended=lambda s, kind: suspended.append((s.name, kind)))
    plan = Plan(egress, pool="p", host="192.0.2.1", port=25)
    first = attempt(plan.next_step())
    plan.failed(unplumbed(first))
    second = attempt(plan.next_step())
    assert (first.source.name, second.source.name) == ("gone", "b")
    retries = [r for r in caplog.records if r.getMessage() == "retrying on the pool's next source"]
    assert [getattr(r, "fields", None) for r in retries] == [
        {"pool": "p", "failed": "gone", "next": "b"}
    ]
    assert egress.health.is_suspended("gone")  # KumoMTA's suspend_when_unplumbed, Immediate
    assert suspended == [("gone", "unplumbed")]
    third_failure = unplumbed(second)
    plan.failed(third_failure)
    assert give_up(plan.next_step()) is third_failure  # no third source
    assert plan.tried == ["gone", "b"]


def test_a_retry_that_finds_no_second_source_reports_the_first_failure(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("gone", "203.0.113.7"))
    plan = Plan(egress, pool="p", host="192.0.2.1", port=25)
    failure = unplumbed(attempt(plan.next_step()))
    plan.failed(failure)
    assert give_up(plan.next_step()) is failure


def test_an_exact_source_is_never_swapped_for_another(clock: FakeClock) -> None:
    gone = v4("gone", "203.0.113.7")
    egress = make_egress(clock, gone, v4("b", "127.0.0.3"))
    plan = Plan(egress, source=gone, host="192.0.2.1", port=25)
    failure = unplumbed(attempt(plan.next_step()))
    plan.failed(failure)
    assert give_up(plan.next_step()) is failure


@pytest.mark.parametrize("kind", [Failure.LOCAL, Failure.DENIED])
def test_nobodys_failures_end_the_plan_and_tell_health_nothing(
    clock: FakeClock, kind: Failure
) -> None:
    egress = make_egress(clock, v4("a"), v4("b", "127.0.0.3"))
    plan = Plan(egress, pool="p", host="192.0.2.1", port=25)
    step = attempt(plan.next_step())
    failure = EgressFailure(kind, "EMFILE", source="a", stage=Stage.CONNECT, address=step.address)
    plan.failed(failure)
    assert give_up(plan.next_step()) is failure
    assert egress.health.snapshot()[0].recent_failures == 0


def test_a_resolver_failure_ends_the_plan(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"), v4("b", "127.0.0.3"))
    plan = Plan(egress, pool="p", host="nowhere.test", port=25)
    assert isinstance(plan.next_step(), Resolve)
    failure = EgressFailure(Failure.RESOLVE, "cannot resolve nowhere.test", stage=Stage.RESOLVE)
    plan.failed(failure)
    assert give_up(plan.next_step()) is failure
    assert plan.tried == ["a"]


# --------------------------------------------------------------------------- which sources


def test_selection_refusals(clock: FakeClock) -> None:
    a = v4("a")
    egress = make_egress(clock, a, pools={"p": ("a",), "empty": ()}, cap=1)
    assert give_up(Plan(egress, pool="nope", host="192.0.2.1").next_step()).kind is (
        Failure.UNKNOWN_POOL
    )
    assert give_up(Plan(egress, host="192.0.2.1").next_step()).kind is Failure.UNKNOWN_POOL
    assert give_up(Plan(egress, pool="empty", host="192.0.2.1").next_step()).kind is (
        Failure.NO_SOURCES
    )
    egress.health.connection_opened("a")
    assert give_up(Plan(egress, pool="p", host="192.0.2.1").next_step()).kind is (
        Failure.SOURCE_LIMIT
    )
    exact = give_up(Plan(egress, source=a, host="192.0.2.1").next_step())
    assert exact.kind is Failure.SOURCE_LIMIT and exact.source == "a"
    egress.health.connection_closed("a")
    egress.health.suspend("a", 60)
    none_left = give_up(Plan(egress, pool="p", host="192.0.2.1").next_step())
    assert none_left.kind is Failure.NO_SOURCES
    assert "every source is suspended" in str(none_left)


def test_source_named(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"))
    assert egress.source_named("a").name == "a"
    with pytest.raises(EgressFailure) as caught:
        egress.source_named("nope")
    assert caught.value.kind is Failure.UNKNOWN_SOURCE


# --------------------------------------------------------------------------- which addresses


def test_access_rules_refuse_a_literal_or_a_port_before_any_source(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"))
    access = AccessSettings()
    denied = give_up(Plan(egress, pool="p", host="127.0.0.1", port=25, access=access).next_step())
    assert denied.kind is Failure.DENIED
    assert "in access.deny_destinations (127.0.0.0/8)" in str(denied)
    port = give_up(Plan(egress, pool="p", host="192.0.2.1", port=22, access=access).next_step())
    assert str(port) == "port 22 is not in access.destination_ports"
    assert egress.health.active_connections("a") == 0


def test_a_name_is_checked_address_by_address(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"))
    access = AccessSettings(deny_destinations=(ipaddress.ip_network("192.0.2.0/25"),))
    plan = Plan(egress, pool="p", host="mx.test", port=25, access=access)
    assert isinstance(plan.next_step(), Resolve)
    plan.resolved([Destination(ip("192.0.2.1"), 25), Destination(ip("192.0.2.200"), 25)])
    assert attempt(plan.next_step()).address == (ip("192.0.2.200"), 25)
    every = Plan(egress, pool="p", host="localhost", port=25, access=AccessSettings())
    assert isinstance(every.next_step(), Resolve)
    every.resolved([Destination(ip("127.0.0.1"), 25), Destination(ip("::1"), 25)])
    failure = give_up(every.next_step())
    assert failure.kind is Failure.DENIED
    assert str(failure).startswith("localhost resolves to a denied address: destination 127.0.0.1")


def test_no_address_of_the_sources_family(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"))
    failure = give_up(Plan(egress, pool="p", host="2001:db8::1", port=25).next_step())
    assert failure.kind is Failure.NO_ADDRESS
    assert "egresses over IPv4 but 2001:db8::1 has no IPv4 address" in str(failure)
    assert failure.party is Party.DESTINATION
    named = Plan(egress, pool="p", host="v6only.test", port=25)
    assert isinstance(named.next_step(), Resolve)
    named.resolved([Destination(ip("2001:db8::1"), 25), Destination(ip("2001:db8::2"), 25)])
    failure = give_up(named.next_step())
    assert failure.kind is Failure.NO_ADDRESS
    assert "v6only.test has no IPv4 address (found 2001:db8::1, 2001:db8::2)" in str(failure)


# --------------------------------------------------------------------------- one deadline


def test_a_deadline_in_a_proxy_stage_blames_the_source(clock: FakeClock) -> None:
    proxy = Source(
        name="px",
        socks5_proxy_server=Endpoint("127.0.0.1", 1080),
        egressd_socks5_plain_connect=True,
    )
    egress = make_egress(clock, proxy)
    plan = Plan(egress, pool="p", host="192.0.2.1", port=25)
    attempt(plan.next_step())
    plan.progress.at(Stage.PROXY_HANDSHAKE, (ip("127.0.0.1"), 1080))
    failure = plan.timed_out()
    assert failure.kind is Failure.PROXY_TIMEOUT
    assert "no result within 30s while in the handshake with the proxy at 127.0.0.1:1080" in str(
        failure
    )
    assert failure.destination is None
    assert egress.health.is_suspended("px")  # suspend_when_proxy_unhealthy, Immediate
    assert give_up(plan.next_step()) is failure


def test_a_deadline_while_connecting_blames_the_destination(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"))
    for _ in range(3):
        plan = Plan(egress, pool="p", host="192.0.2.66", port=25)
        attempt(plan.next_step())
        failure = plan.timed_out()
        assert failure.kind is Failure.TIMEOUT and failure.destination == DEAD
    assert not egress.health.is_suspended("a")
    assert egress.breaker.check(DEAD) is not None


def test_a_deadline_while_resolving_tells_nobody(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"))
    plan = Plan(egress, pool="p", host="slow.test", port=25)
    assert isinstance(plan.next_step(), Resolve)
    failure = plan.timed_out()
    assert failure.kind is Failure.TIMEOUT
    assert "while resolving slow.test" in str(failure)
    assert egress.health.snapshot()[0].recent_failures == 0
    before_any = Plan(egress, pool="p", host="slow.test", port=25).timed_out()
    assert "egressd: no result within 30s while choosing a source for slow.test" in str(before_any)


# --------------------------------------------------------------------------- health blames


def test_a_dead_destination_never_suspends_a_source_and_fails_fast_once_open(
    clock: FakeClock,
) -> None:
    egress = make_egress(clock, v4("a"), v4("b", "127.0.0.3"))
    for _ in range(3):
        plan = Plan(egress, pool="p", host="192.0.2.66", port=25)
        plan.failed(refused(attempt(plan.next_step())))
        clock.now += 1
    assert not egress.health.is_suspended("a") and not egress.health.is_suspended("b")
    plan = Plan(egress, pool="p", host="192.0.2.66", port=25)
    failure = give_up(plan.next_step())  # no socket: the breaker answers
    assert failure.kind is Failure.DESTINATION_FAILING
    assert failure.cause is Failure.REFUSED
    assert failure.destination == DEAD
    assert "destination 192.0.2.66:25 is failing (3 failures" in str(failure)
    live = Plan(egress, pool="p", host="192.0.2.1", port=25)
    assert attempt(live.next_step()).address == LIVE  # other destinations are untouched


def test_an_open_breaker_skips_to_the_next_address(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"))
    for _ in range(3):
        egress.breaker.failure(DEAD, Failure.TIMEOUT, "silent")
    plan = Plan(egress, pool="p", host="mx.test", port=25)
    assert isinstance(plan.next_step(), Resolve)
    plan.resolved([Destination(DEAD[0], 25), Destination(LIVE[0], 25)])
    assert attempt(plan.next_step()).address == LIVE
    assert [f.kind for f in plan.failures] == [Failure.DESTINATION_FAILING]


def test_failures_at_destinations_that_other_sources_reach_suspend_the_source(
    clock: FakeClock,
) -> None:
    spread = SuspendPolicy(duration=60.0, count=3, window=60.0)
    egress = make_egress(
        clock,
        v4("a"),
        v4("b", "127.0.0.3"),
        pools={"only-a": ("a",), "only-b": ("b",)},
        health=HealthSettings(suspend_on_connect_failures=spread),
    )
    destinations = [f"192.0.2.{n}" for n in (1, 2, 3)]
    for host in destinations:
        reached = Plan(egress, pool="only-b", host=host, port=25)
        attempt(reached.next_step())
        reached.succeeded()
    for _ in range(2):  # the same destination twice counts once
        plan = Plan(egress, pool="only-a", host=destinations[0], port=25)
        plan.failed(refused(attempt(plan.next_step())))
    assert not egress.health.is_suspended("a")
    for host in destinations[1:]:
        plan = Plan(egress, pool="only-a", host=host, port=25)
        plan.failed(refused(attempt(plan.next_step())))
    status = {s.name: s for s in egress.health.snapshot()}
    assert status["a"].suspended and status["a"].suspension_kind == "connect"
    assert not status["b"].suspended


def test_failures_nobody_else_reaches_are_the_destinations(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"), v4("b", "127.0.0.3"))
    for n in range(1, 10):
        plan = Plan(egress, pool="p", host=f"192.0.2.{n}", port=25)
        plan.failed(refused(attempt(plan.next_step())))
    assert not any(s.suspended for s in egress.health.snapshot())


def test_a_success_forgets_the_sources_failures(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"))
    plan = Plan(egress, pool="p", host="192.0.2.1", port=25)
    attempt(plan.next_step())
    egress.health.record_failure("a", "connect", "x", SuspendPolicy(60, 3, 60))
    plan.succeeded()
    assert egress.health.snapshot()[0].recent_failures == 0
    Plan(egress, pool="p", host="192.0.2.1").succeeded()  # nothing attempted: nothing to say


# --------------------------------------------------------------------------- failure kinds


def test_every_kind_blames_one_party() -> None:
    source = {Failure.UNPLUMBED, Failure.PROXY_UNREACHABLE, Failure.PROXY_REFUSED}
    source.add(Failure.PROXY_TIMEOUT)
    nobody = {
        Failure.LOCAL,
        Failure.DENIED,
        Failure.UNKNOWN_POOL,
        Failure.UNKNOWN_SOURCE,
        Failure.NO_SOURCES,
        Failure.SOURCE_LIMIT,
        Failure.WARMUP_QUOTA,
        Failure.BUDGET,
    }
    for kind in Failure:
        expected = (
            Party.SOURCE
            if kind in source
            else Party.NOBODY
            if kind in nobody
            else Party.DESTINATION
        )
        assert blame(kind) is expected, kind
    assert str(Failure.REFUSED) == "refused"
    assert Failure("refused") is Failure.REFUSED
    assert str(Stage.CONNECT) == "connect"
    assert timeout_kind(Stage.PROXY_CONNECT) is Failure.PROXY_TIMEOUT
    assert timeout_kind(Stage.SESSION) is Failure.TIMEOUT


def test_a_failure_knows_its_destination_only_past_the_proxy() -> None:
    at_proxy = EgressFailure(
        Failure.PROXY_REFUSED, "x", stage=Stage.PROXY_HANDSHAKE, address=(ip("127.0.0.1"), 1080)
    )
    at_destination = EgressFailure(Failure.REJECTED, "421", stage=Stage.SESSION, address=LIVE)
    assert at_proxy.destination is None
    assert at_destination.destination == LIVE
    assert EgressFailure(Failure.LOCAL, "x").destination is None


def test_refusal_says_what_pick_would_raise_without_moving_the_rotation(clock: FakeClock) -> None:
    egress = make_egress(clock, v4("a"), v4("b", "127.0.0.3"), cap=1)
    assert egress.refusal("p") is None
    assert [egress.pick("p").name for _ in range(2)] == ["a", "b"]  # refusal() picked none
    egress.health.connection_opened("a")
    egress.health.connection_opened("b")
    failure = egress.refusal("p")
    assert failure is not None and failure.kind is Failure.SOURCE_LIMIT
    with pytest.raises(EgressFailure) as raised:
        egress.pick("p")
    assert str(raised.value) == str(failure)  # the same words
    assert egress.refusal("p", leaving="b") is None  # b's kept connection would close first
    assert egress.refusal("nope") is not None
