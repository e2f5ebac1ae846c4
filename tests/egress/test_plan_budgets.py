"""The plan and per-destination budgets: skipping, exact WRR among the rest, leases, BUDGET.

The real shaper (:mod:`egressd.shaping`) on a fake clock, bound to the plan's destination
by :class:`egressd.net.shaping.ShapedDestination`, as the doors bind it.
"""

from __future__ import annotations

from ipaddress import ip_address

from fake_clock import FakeClock
from test_plan import attempt, give_up, make_egress, refused, unplumbed, v4

from egressd.egress import Attempt, Destination, EgressFailure, Failure, Plan, Resolve
from egressd.net.shaping import ShapedDestination, proxy_budget, smtp_budget
from egressd.shaping import Shaper, ShapingPolicy
from egressd.shaping.files import load_shaping_data

HOST = "192.0.2.1"


def shaper(clock: FakeClock, limit: int) -> Shaper:
    files = load_shaping_data("shaping.toml", {"default": {"connection_limit": limit}})
    return Shaper(ShapingPolicy.from_files(files, {}), clock)


def budget(s: Shaper) -> ShapedDestination:
    found = proxy_budget(s, HOST)
    assert found is not None
    return found


def test_a_suspended_source_is_skipped_and_wrr_stays_exact_among_the_rest() -> None:
    clock = FakeClock()
    egress = make_egress(clock, v4("a"), v4("b", "127.0.0.3"), v4("c", "127.0.0.4"))
    s = shaper(clock, 100)
    s.suspend(("b", "site", HOST), 60, "test")
    picked = []
    for _ in range(6):
        plan = Plan(egress, pool="p", host=HOST, port=25, budget=budget(s))
        picked.append(attempt(plan.next_step()).source.name)
        plan.release_budget()
    assert picked == ["a", "c", "a", "c", "a", "c"]


def test_connection_limit_leases_are_held_until_released() -> None:
    clock = FakeClock()
    egress = make_egress(clock, v4("a"), v4("b", "127.0.0.3"))
    s = shaper(clock, 1)
    first = Plan(egress, pool="p", host=HOST, port=25, budget=budget(s))
    second = Plan(egress, pool="p", host=HOST, port=25, budget=budget(s))
    assert attempt(first.next_step()).source.name == "a"
    assert attempt(second.next_step()).source.name == "b"
    third = Plan(egress, pool="p", host=HOST, port=25, budget=budget(s))
    failure = give_up(third.next_step())
    assert failure.kind is Failure.BUDGET
    assert str(failure) == (
        'no source of pool "p" may connect to site "192.0.2.1" now '
        "(connection_limit 1 reached for all 2 sources)"
    )
    first.release_budget()
    first.release_budget()  # idempotent
    fourth = Plan(egress, pool="p", host=HOST, port=25, budget=budget(s))
    assert attempt(fourth.next_step()).source.name == "a"


def test_a_retry_on_the_next_source_moves_the_lease_and_giving_up_returns_it() -> None:
    clock = FakeClock()
    egress = make_egress(clock, v4("a"), v4("b", "127.0.0.3"))
    s = shaper(clock, 1)
    plan = Plan(egress, pool="p", host=HOST, port=25, budget=budget(s))
    step = attempt(plan.next_step())
    plan.failed(unplumbed(step))  # the source's fault: the pool's next source
    step = attempt(plan.next_step())
    assert step.source.name == "b"
    assert s.check_open("a", budget(s).destination) is None  # a's lease went back
    plan.failed(unplumbed(step))
    give_up(plan.next_step())
    assert s.check_open("b", budget(s).destination) is None


def test_an_exact_source_over_its_budget_is_refused() -> None:
    clock = FakeClock()
    a = v4("a")
    egress = make_egress(clock, a)
    s = shaper(clock, 1)
    assert attempt(Plan(egress, source=a, host=HOST, budget=budget(s)).next_step())
    failure = give_up(Plan(egress, source=a, host=HOST, budget=budget(s)).next_step())
    assert failure.kind is Failure.BUDGET
    assert 'connection_limit 1 reached for source "a"' in str(failure)


def test_the_smtp_door_skips_a_source_whose_message_rate_is_used_up_before_connecting() -> None:
    clock = FakeClock()
    egress = make_egress(clock, v4("a"), v4("b", "127.0.0.3"))
    files = load_shaping_data("shaping.toml", {"default": {"max_message_rate": "1/h"}})
    s = Shaper(ShapingPolicy.from_files(files, {}), clock)
    mx = [(10, "mx.good.test")]
    picked = []
    for _ in range(3):
        smtp = smtp_budget(s, "good.test", mx)
        assert smtp is not None
        plan = Plan(egress, pool="p", budget=smtp)
        step = plan.next_step()
        if isinstance(step, Resolve):
            picked.append(step.source.name)
            assert smtp.lease is not None and smtp.lease.send() is None  # one message
        else:
            picked.append(str(give_up(step)))
        plan.release_budget()
    assert picked[:2] == ["a", "b"]
    assert picked[2] == (
        'no source of pool "p" may connect to site "mx.good.test" now '
        "(max_message_rate 1/h used up for all 2 sources)"
    )
    # the SOCKS5 and PROXY doors carry no messages: their selection ignores message rates
    plan = Plan(egress, pool="p", host=HOST, port=25, budget=budget(s))
    assert attempt(plan.next_step()).source.name in ("a", "b")


def test_a_rule_that_suspends_the_source_on_its_greeting_moves_the_plan_to_the_next_source() -> (
    None
):
    clock = FakeClock()
    egress = make_egress(clock, v4("a"), v4("b", "127.0.0.3"))
    s = shaper(clock, 100)
    mx = [(10, "mx.good.test")]
    smtp = smtp_budget(s, "good.test", mx)
    assert smtp is not None
    plan = Plan(egress, pool="p", budget=smtp)
    two = [Destination(ip_address("192.0.2.1")), Destination(ip_address("192.0.2.2"))]

    def rejected(step: Attempt) -> EgressFailure:
        return EgressFailure(
            Failure.REJECTED, "421 [TSS04]", source=step.source.name, address=step.address
        )

    plan.next_step()
    plan.resolved(two)
    first = attempt(plan.next_step())
    plan.failed(rejected(first))  # an ordinary 421 banner: the same source's next address
    second = attempt(plan.next_step())
    assert (second.source.name, second.destination) == ("a", two[1])
    s.suspend(("a", "site", "mx.good.test"), 3600, "rule: /TSS04/")  # what the rule did
    plan.failed(rejected(second))
    assert isinstance(plan.next_step(), Resolve)  # the pool's next source, b, resolves
    plan.resolved(two)
    third = attempt(plan.next_step())
    assert (third.source.name, third.destination) == ("b", two[0])
    s.suspend(("b", "site", "mx.good.test"), 3600, "rule: /TSS04/")
    plan.failed(rejected(third))  # b suspended too, and no third source is tried
    assert give_up(plan.next_step()).source == "b"
    assert smtp.lease is None  # giving up gave the lease back


def test_connections_made_are_told_with_their_provider_until_released() -> None:
    clock = FakeClock()
    egress = make_egress(clock, v4("a"), v4("b", "127.0.0.3"))
    files = load_shaping_data(
        "shaping.toml", {"provider": {"big": {"match": [{"MXSuffix": ".big-mx.test"}]}}}
    )
    s = Shaper(ShapingPolicy.from_files(files, {}), clock)
    told: list[tuple[str, str, int]] = []
    smtp = smtp_budget(s, "big.test", [(10, "mx1.big-mx.test")])
    assert smtp is not None
    smtp.on_connection = lambda *event: told.append(event)
    plan = Plan(egress, pool="p", budget=smtp)
    plan.next_step()
    plan.resolved([Destination(ip_address("192.0.2.1")), Destination(ip_address("192.0.2.2"))])
    plan.failed(refused(attempt(plan.next_step())))
    assert told == []  # a failed attempt is no connection
    attempt(plan.next_step())
    plan.succeeded()
    assert told == [("a", "big", 1)]
    plan.release_budget()
    plan.release_budget()
    assert told == [("a", "big", 1), ("a", "big", -1)]


def test_consecutive_failures_hold_the_source_site_path_and_never_the_source() -> None:
    clock = FakeClock()
    egress = make_egress(clock, v4("a"), pools={"only-a": ("a",)})
    files = load_shaping_data(
        "shaping.toml", {"default": {"consecutive_connection_failures_before_delay": 2}}
    )
    s = Shaper(ShapingPolicy.from_files(files, {}), clock)
    mx = [(10, "mx.dead.test")]

    def plan_for(domain: str, records: list[tuple[int, str]]) -> Plan:
        smtp = smtp_budget(s, domain, records)
        assert smtp is not None
        plan = Plan(egress, pool="only-a", budget=smtp)
        plan.next_step()
        plan.resolved([Destination(ip_address("192.0.2.66"))])
        return plan

    for _ in range(2):
        plan = plan_for("dead.test", mx)
        plan.failed(refused(attempt(plan.next_step())))
    held = give_up(Plan(egress, pool="only-a", budget=smtp_budget(s, "dead.test", mx)).next_step())
    assert held.kind is Failure.BUDGET
    assert 'consecutive_connection_failures_before_delay 2 reached for source "a" to site ' in (
        str(held)
    )
    assert not egress.health.is_suspended("a")
    other = plan_for("good.test", [(10, "mx.good.test")])  # a still goes elsewhere
    assert attempt(other.next_step()).source.name == "a"
    clock.advance(61)  # the hold is over: a tries the site again
    assert attempt(plan_for("dead.test", mx).next_step()).source.name == "a"


def test_a_site_that_keeps_rejecting_one_source_moves_the_plan_to_the_next_source() -> None:
    clock = FakeClock()
    pools = {"p": ("a", "b"), "only-a": ("a",)}
    egress = make_egress(clock, v4("a"), v4("b", "127.0.0.3"), pools=pools)
    s = shaper(clock, 100)
    addresses = [Destination(ip_address("192.0.2.1")), Destination(ip_address("192.0.2.2"))]
    for _ in range(3):  # what three [TSS04] greetings to a at mx.good.test leave behind
        egress.breaker.failure(
            (addresses[0].address, 25), Failure.REJECTED, "421 [TSS04]", source="a",
            site="mx.good.test",
        )  # fmt: skip
    smtp = smtp_budget(s, "good.test", [(10, "mx.good.test")])
    plan = Plan(egress, pool="p", budget=smtp)
    step = plan.next_step()
    assert isinstance(step, Resolve) and step.source.name == "a"
    plan.resolved(addresses)
    step = plan.next_step()  # no socket from a: both addresses of its site refuse it
    assert isinstance(step, Resolve) and step.source.name == "b"
    plan.resolved(addresses)
    assert attempt(plan.next_step()).source.name == "b"
    assert [f.kind for f in plan.failures] == [Failure.DESTINATION_FAILING] * 2
    assert 'is failing from source "a"' in plan.failures[0].detail
    assert not egress.health.is_suspended("a")
    other = smtp_budget(s, "other.test", [(10, "mx.other")])
    elsewhere = Plan(egress, pool="only-a", budget=other)
    assert isinstance(elsewhere.next_step(), Resolve)
    elsewhere.resolved(addresses)
    assert attempt(elsewhere.next_step()).source.name == "a"  # another site: a goes
