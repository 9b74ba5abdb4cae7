"""Admission of unary calls (admission.py): a server-wide number at once, callers in turn."""

from __future__ import annotations

import asyncio

import pytest
from framecast_server.core.admission import Admission
from framecast_server.service.callers import peer_host


async def _admit_all(admission: Admission, calls: list[tuple[str, int]]) -> list[int]:
    """Start every call in order; each, once admitted, records its number and stays.

    Then, while calls wait, the earliest admitted call still in leaves.
    """
    order: list[int] = []
    callers: dict[int, str] = dict((n, caller) for caller, n in calls)

    async def call(caller: str, number: int) -> None:
        await admission.enter(caller)
        order.append(number)

    tasks = [asyncio.ensure_future(call(caller, n)) for caller, n in calls]
    await asyncio.sleep(0)
    left = 0
    while admission.waiting:
        admission.leave(callers[order[left]])
        left += 1
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    return order


async def test_a_caller_alone_gets_every_place_and_waits_first_in_first_out() -> None:
    admission = Admission(3)
    order = await _admit_all(admission, [("a", n) for n in range(7)])
    assert order == list(range(7))
    # Three places taken (never the spare: it is for callers holding none); four handed on.
    assert admission.admitted == 3
    assert admission.admitted_for("a") == 3


async def test_freed_places_go_to_the_waiting_callers_in_turn() -> None:
    admission = Admission(2, spare=0)
    calls = [("greedy", n) for n in range(10)] + [("polite", 100), ("other", 200)]
    order = await _admit_all(admission, calls)
    # Two admitted at once; then the greedy caller, the polite and the other take turns,
    # so the polite caller's call is not behind the greedy caller's eight waiting ones.
    assert order[:2] == [0, 1]
    assert sorted(order[2:5]) == [2, 100, 200]
    assert order[5:] == list(range(3, 10))


async def test_beside_other_callers_a_caller_takes_places_only_below_its_share() -> None:
    admission = Admission(8, spare=0)
    for _ in range(8):
        await admission.enter("greedy")  # alone: every place
    more = [asyncio.ensure_future(admission.enter("greedy")) for _ in range(8)]
    polite = asyncio.ensure_future(admission.enter("polite"))
    await asyncio.sleep(0)
    assert admission.waiting == 9
    admission.leave("greedy")
    await asyncio.sleep(0)
    assert polite.done()  # in turn, and below its share
    # Two callers in: the greedy caller's share is 4 of the 8 places. Its calls end; freed
    # places stay free until it holds fewer than 4.
    for _ in range(3):
        admission.leave("greedy")
    await asyncio.sleep(0)
    assert admission.admitted_for("greedy") == 4
    assert admission.admitted == 5
    assert admission.waiting_for("greedy") == 8
    admission.leave("greedy")
    await asyncio.sleep(0)
    assert admission.admitted_for("greedy") == 4
    assert admission.waiting_for("greedy") == 7
    # The polite caller leaves: the greedy caller is alone again and takes every place.
    admission.leave("polite")
    await asyncio.sleep(0)
    assert admission.admitted_for("greedy") == 8
    assert admission.waiting_for("greedy") == 3
    for task in more:
        task.cancel()
    await asyncio.gather(*more, return_exceptions=True)


async def test_beside_a_caller_in_recently_a_flood_runs_one_call_at_a_time() -> None:
    now = [100.0]
    admission = Admission(8, spare=1, beside_others=1, presence_s=0.5, clock=lambda: now[0])
    for _ in range(8):
        await admission.enter("greedy")  # alone: every place
    more = [asyncio.ensure_future(admission.enter("greedy")) for _ in range(20)]
    await asyncio.sleep(0)
    assert admission.waiting_for("greedy") == 20
    await asyncio.wait_for(admission.enter("polite"), 1)  # holding none: the spare, at once
    admission.leave("polite")  # its call ended; it stays in for presence_s
    now[0] += 0.1
    # The greedy caller's calls end; beside a caller in, none is replaced until it holds
    # fewer than one.
    for held in range(7, 0, -1):
        admission.leave("greedy")
        await asyncio.sleep(0)
        assert admission.admitted_for("greedy") == held
    assert admission.waiting_for("greedy") == 20
    admission.leave("greedy")
    await asyncio.sleep(0)
    assert admission.admitted_for("greedy") == 1  # holding none, it takes one again
    assert admission.waiting_for("greedy") == 19
    # The polite caller's next call: admitted at once, beside the greedy caller's one.
    await asyncio.wait_for(admission.enter("polite"), 1)
    assert admission.admitted == 2
    admission.leave("polite")
    # Half a second after the polite caller's last call, the greedy caller is alone again:
    # its next call ending gives it every place.
    now[0] += 0.6
    admission.leave("greedy")
    await asyncio.sleep(0)
    assert admission.admitted_for("greedy") == 8
    assert admission.waiting_for("greedy") == 11
    for task in more:
        task.cancel()
    await asyncio.gather(*more, return_exceptions=True)


async def test_a_caller_alone_keeps_every_place_with_a_presence_time() -> None:
    now = [0.0]
    admission = Admission(4, beside_others=1, presence_s=0.5, clock=lambda: now[0])
    order = await _admit_all(admission, [("a", n) for n in range(9)])
    assert order == list(range(9))
    assert admission.admitted_for("a") == 4  # its own recent calls do not count as others


async def test_a_caller_that_leaves_gives_the_others_their_shares_back() -> None:
    admission = Admission(4, spare=0)
    for _ in range(2):
        await admission.enter("a")
    await admission.enter("b")
    waiting_a = asyncio.ensure_future(admission.enter("a"))
    waiting_c = asyncio.ensure_future(admission.enter("c"))
    await asyncio.sleep(0)
    # Two callers in when "a" asked: shares of 2, and "a" holds two; "c" held none and took
    # the free place.
    assert not waiting_a.done()
    assert waiting_c.done()
    assert admission.admitted == 4
    admission.leave("b")
    await asyncio.sleep(0)
    # "b" has left: two callers, shares of 2; "a" holds 2 and still waits.
    assert not waiting_a.done()
    admission.leave("c")
    await asyncio.sleep(0)
    assert waiting_a.done()  # alone: every place
    assert admission.admitted_for("a") == 3


async def test_a_caller_holding_no_place_takes_the_spare_at_once() -> None:
    admission = Admission(2)
    for _ in range(2):
        await admission.enter("greedy")
    more = [asyncio.ensure_future(admission.enter("greedy")) for _ in range(5)]
    await asyncio.sleep(0)
    assert admission.waiting_for("greedy") == 5  # the spare is not for a caller holding places
    await asyncio.wait_for(admission.enter("polite"), 1)  # admitted on arrival, not in turn
    assert admission.admitted == 3
    # The spare is taken: another newcomer waits, and the polite caller's second call too.
    other = asyncio.ensure_future(admission.enter("other"))
    second = asyncio.ensure_future(admission.enter("polite"))
    await asyncio.sleep(0)
    assert admission.waiting_for("other") == 1
    assert admission.waiting_for("polite") == 1
    # A greedy call ends: below the capacity plus spare, and only "other" (holding none) may
    # have it: the greedy caller, first in turn, keeps its turn.
    admission.leave("greedy")
    await asyncio.sleep(0)
    assert other.done()
    assert not second.done()
    assert admission.waiting_for("greedy") == 5
    # The polite call ends: the polite caller holds none again, so its second call takes the
    # spare; the greedy caller still waits for a place within the capacity.
    admission.leave("polite")
    await asyncio.sleep(0)
    assert second.done()
    assert admission.admitted == 3
    assert admission.waiting_for("greedy") == 5
    # "other" ends: two admitted, the capacity, so the greedy caller still waits; the polite
    # call ends too: a place within the capacity, the greedy caller's turn.
    admission.leave("other")
    await asyncio.sleep(0)
    assert admission.admitted == 2
    assert admission.waiting_for("greedy") == 5
    admission.leave("polite")
    await asyncio.sleep(0)
    assert admission.admitted_for("greedy") == 2
    assert admission.waiting_for("greedy") == 4
    for task in more:
        task.cancel()
    await asyncio.gather(*more, return_exceptions=True)


async def test_a_call_cancelled_while_waiting_takes_no_place() -> None:
    admission = Admission(1, spare=0)
    await admission.enter("a")
    waiting = asyncio.ensure_future(admission.enter("b"))
    later = asyncio.ensure_future(admission.enter("c"))
    await asyncio.sleep(0)
    assert admission.waiting == 2
    waiting.cancel()
    await asyncio.sleep(0)
    assert admission.waiting == 1
    assert admission.waiting_for("b") == 0
    admission.leave("a")
    await later
    assert admission.admitted == 1
    admission.leave("c")
    assert admission.admitted == 0
    assert admission.waiting == 0


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Admission(0)
    with pytest.raises(ValueError, match="negative"):
        Admission(1, spare=-1)
    with pytest.raises(ValueError, match="at least 1"):
        Admission(1, beside_others=0)
    with pytest.raises(ValueError, match="negative"):
        Admission(1, presence_s=-1.0)


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:51234", "ipv4:127.0.0.1"),
        ("ipv4:10.0.0.7:1", "ipv4:10.0.0.7"),
        ("ipv6:[::1]:51234", "ipv6:[::1]"),
        ("ipv6:%5B::1%5D:51234", "ipv6:%5B::1%5D"),
        ("unix:/tmp/socket", "unix:/tmp/socket"),
        ("unix-abstract:name", "unix-abstract:name"),
    ],
)
def test_a_callers_host_is_its_peer_without_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host
