"""The owner tracker's pure parts: the holder index and the schedule of what to read. No /proc.

(tests/test_scan.py runs the tracker itself against real processes.)
"""

from __future__ import annotations

import pytest

from portwatch.holders import HolderIndex
from portwatch.schedule import PID_COST, RECHECK_TICKS, Recency, RecheckTurns, Rotation, SearchOrder

# -- the holder index --------------------------------------------------------------------------

# Each step: (operation, pid, argument); after it, every inode's holders and the dirty inodes.
STEPS = [
    pytest.param([("set", 10, {b"3": 100, b"4": 101})], {100: (10,), 101: (10,)}, {100, 101}, id="a server"),
    pytest.param([("set", 10, {b"3": 100}), ("set", 11, {b"3": 100})], {100: (10, 11)}, {100},
                 id="a worker inherits it"),
    pytest.param([("set", 10, {b"3": 100}), ("set", 11, {b"3": 100}), "taken", ("forget", 10, None)],
                 {100: (11,)}, {100}, id="the master exits"),
    pytest.param([("set", 10, {b"3": 100, b"7": 100}), "taken", ("drop", 10, [b"3"])],
                 {100: (10,)}, set(), id="a dup closed: still held"),
    pytest.param([("set", 10, {b"3": 100, b"7": 100}), "taken", ("drop", 10, [b"3", b"7"])],
                 {}, {100}, id="both copies closed"),
    pytest.param([("set", 10, {b"3": 100}), "taken", ("set", 10, {b"3": 100})], {100: (10,)}, set(),
                 id="read again, unchanged"),
    pytest.param([("set", 10, {b"3": 100}), "taken", ("set", 10, {b"3": 200})], {200: (10,)}, {100, 200},
                 id="fd reused for another socket"),
    pytest.param([("set", 10, {b"3": 100, b"4": 101}), ("set", 11, {b"3": 101}), "taken",
                  ("keep", None, {101})], {101: (10, 11)}, {100}, id="a listener closed"),
    pytest.param([("set", 10, {b"3": 100}), "taken", ("touch", None, [100])], {100: (10,)}, {100},
                 id="details changed"),
    pytest.param([("set", 10, {})], {}, set(), id="no listener at all"),
]


@pytest.mark.parametrize(("steps", "holders", "dirty"), STEPS)
def test_holder_index(steps: list[object], holders: dict[int, tuple[int, ...]], dirty: set[int]) -> None:
    index = HolderIndex()
    for step in steps:
        if step == "taken":
            index.take_dirty()
            continue
        op, pid, arg = step  # type: ignore[misc]
        if op == "set":
            index.set_fds(pid, dict(arg))
        elif op == "drop":
            index.drop_fds(pid, arg)
        elif op == "forget":
            index.forget(pid)
        elif op == "keep":
            index.keep_listening(arg)
        elif op == "touch":
            index.touch(arg)
    assert {inode: index.holders_of(inode) for inode in index.held_inodes()} == holders
    assert index.take_dirty() == dirty
    assert set(index.pids()) == {pid for pids in holders.values() for pid in pids}
    for pid in index.pids():
        assert index.inodes_of(pid) == {i for i, pids in holders.items() if pid in pids}


def test_set_fds_says_which_inodes_are_new_to_the_process() -> None:
    index = HolderIndex()
    assert index.set_fds(10, {b"3": 100}) == {100}
    assert index.set_fds(10, {b"3": 100, b"4": 101}) == {101}
    assert index.set_fds(11, {b"3": 100}) == {100}  # new to 11, though 10 holds it too
    assert index.set_fds(10, {}) == set()
    assert not index.holds(10) and index.holders_of(100) == (11,) and index.fds(10) == {}


# -- the schedule ------------------------------------------------------------------------------


def test_every_holder_is_rechecked_whole_once_per_turn_cycle() -> None:
    turns = RecheckTurns()
    pids = range(100, 140)
    whole = [{pid for pid in pids if RecheckTurns.whole(pid, turn)}
             for turn in (turns.next() for _ in range(RECHECK_TICKS))]
    assert set().union(*whole) == set(pids)
    assert sum(map(len, whole)) == len(pids)  # each exactly once


@pytest.mark.parametrize(
    ("recent", "uids", "expected"),
    [
        pytest.param({}, {0}, [[3], [5], [1], [2, 4]], id="changed fd count, the socket's uid first"),
        pytest.param({4: 9, 2: 7}, {0}, [[4], [2], [3], [5], [1]], id="recent first, newest first"),
        pytest.param({3: 9}, {1000}, [[3], [5], [2], [1, 4]], id="then changed, the uid, the rest"),
    ],
)
def test_search_order(recent: dict[int, int], uids: set[int], expected: list[list[int]]) -> None:
    """Candidates 1-5: 1, 3 and 5 run as root, 2 as uid 1000, 4's uid is unknown (it exited);
    3 (root) and 5 (uid 1000) have more or fewer fds open than when last read."""
    recency = Recency()
    for pid, tick in recent.items():
        recency.note([pid], tick)
    uid_of = {1: 0, 2: 1000, 3: 0, 4: None, 5: 1000}
    order = SearchOrder({1, 2, 3, 4, 5}, recency, uids, lambda pid: (uid_of[pid], pid in (3, 5)))
    likely = list(order.likely())
    assert set(likely) == {3, 5} | set(recent)  # the rest only when these do not explain it
    found = [*likely, *order.rest()]
    groups, at = [], 0
    for group in expected:
        groups.append(sorted(found[at:at + len(group)]))
        at += len(group)
    assert groups == expected and len(found) == 5


def test_search_order_looks_only_as_far_as_it_goes() -> None:
    looked: list[int] = []

    def look(pid: int) -> tuple[int, bool]:
        looked.append(pid)
        return 0, True

    order = SearchOrder(range(1000), Recency(), {0}, look).likely()
    assert next(order) in range(1000) and len(looked) == 1


def test_recency_expires() -> None:
    recency = Recency()
    recency.note([1], 10)
    recency.note([2], 200)
    recency.expire(200)
    assert recency.newest_first({1, 2}) == [2]


def test_rotation_visits_every_process_once_per_cycle_and_balances_work() -> None:
    rotation = Rotation(4)
    costs = {pid: (1000 if pid < 4 else 10) for pid in range(40)}  # four heavy workers
    for pid, links in costs.items():
        rotation.weigh(pid, links)
    steps = [rotation.step() for _ in range(4)]
    assert set().union(*steps) == set(costs) and sum(map(len, steps)) == len(costs)
    heavy_slots = [i for i, step in enumerate(steps) if step & {0, 1, 2, 3}]
    assert len(heavy_slots) == 4  # one heavy worker per slot, not all in one
    work = [sum(costs[pid] + PID_COST for pid in step) for step in steps]
    assert max(work) - min(work) <= 1000 + PID_COST
    assert rotation.step() == steps[0]  # the cycle starts again


def test_rotation_forgets_and_reweighs() -> None:
    rotation = Rotation(2)
    rotation.weigh(1, 100)
    rotation.weigh(2, 0)
    rotation.weigh(1, 0)  # lighter now: its slot's load follows
    assert sorted(rotation.load()) == [PID_COST, PID_COST]
    rotation.forget(1)
    assert sorted(rotation.load()) == [0, PID_COST]
    assert rotation.step() | rotation.step() == {2}
