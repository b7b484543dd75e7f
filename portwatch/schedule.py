"""Which processes the owner tracker reads at each tick, and in what order. Pure.

- A holder whose fd count changed has every fd re-checked once per
  RECHECK_TICKS regular ticks, one of its fds at the others (`RecheckTurns`).
- Processes seen starting, exec'ing or opening a listener lately are searched
  first for a new inode, then those whose fd count changed, then those of the
  socket's uid (`SearchOrder`).
- Every process is looked at once per rotation (`Rotation`), in the slot that
  has the least work, so a handover to an old process (SCM_RIGHTS) is found
  and cached details are refreshed; its fds are read when their count changed
  since the last read, and in every THOROUGH_ROUNDS-th round whatever it says.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator

# Every fd of a holder whose fd count changed is re-checked once per this many ticks, one of
# them at the others: a holder's exit is still seen at the next tick (every read through its fd
# directory fails then), and an fd closed by a running holder (an owner set shrinking) within 4.
RECHECK_TICKS = 4
# Processes first seen within this many ticks are searched first for a new inode.
RECENT_TICKS = 120
# A process costs about as much as this many fds to open, list and close.
PID_COST = 8
# The rotation reads a process whose fd count has not changed since it was last read only in one
# round of this many (a socket handed over while another fd closed leaves the count as it was).
THOROUGH_ROUNDS = 10


class RecheckTurns:
    """Whose fds are re-checked whole at a regular tick: those whose pid falls on this turn."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0  # regular ticks so far: early ones skip the re-check, so they take no turn

    def next(self) -> int:
        self.count += 1
        return self.count % RECHECK_TICKS

    @staticmethod
    def whole(pid: int, turn: int) -> bool:
        return pid % RECHECK_TICKS == turn


class Recency:
    """pid -> the tick it last started, was hinted, or opened a listener: where listeners appear."""

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        self._seen: dict[int, int] = {}

    def note(self, pids: Collection[int], tick: int) -> None:
        for pid in pids:
            self._seen[pid] = tick

    def forget(self, pid: int) -> None:
        self._seen.pop(pid, None)

    def expire(self, tick: int) -> None:
        """Forget what is older than RECENT_TICKS (called now and then, not every tick)."""
        oldest = tick - RECENT_TICKS
        self._seen = {pid: t for pid, t in self._seen.items() if t > oldest}

    def newest_first(self, candidates: Collection[int]) -> list[int]:
        seen = self._seen
        return sorted((p for p in candidates if p in seen), key=seen.__getitem__, reverse=True)


class SearchOrder:
    """The processes to read for inodes nobody is known to hold, likeliest first.

    Pid numbers wrap, so they say nothing about age; what the tracker saw
    does. `likely()`: the processes it saw start, exec or open a listener
    lately (newest first: a server that opened one port often opens more),
    then those whose fd table changed size since they were last read (a
    process that opened a socket has one more fd). `rest()`: the others,
    which a search reaches only when the likely ones do not explain every
    inode. Within each group, those running as one of the sockets' `uids`
    (the kernel records the creator's uid on a socket) come first.
    `look(pid)` -> (uid, fd table changed or not known) is one stat per
    process, asked only as far as the search goes: cheap beside reading
    every fd of the processes it puts last.
    """

    __slots__ = ("_candidates", "_look", "_recency", "_rest", "_uids")

    def __init__(self, candidates: Collection[int], recency: Recency, uids: Collection[int],
                 look: Callable[[int], tuple[int | None, bool]]) -> None:
        self._candidates, self._recency, self._uids, self._look = candidates, recency, uids, look
        self._rest: tuple[list[int], list[int]] = ([], [])  # unchanged: of the uids, others

    def likely(self) -> Iterator[int]:
        recent = self._recency.newest_first(self._candidates)
        yield from recent
        changed_other: list[int] = []
        same_own, same_other = self._rest
        for pid in set(self._candidates).difference(recent):
            uid, changed = self._look(pid)
            if changed and uid in self._uids:
                yield pid  # the likeliest: read before the others are even looked at
            elif changed:
                changed_other.append(pid)
            else:
                (same_own if uid in self._uids else same_other).append(pid)
        yield from changed_other

    def rest(self) -> list[int]:
        """The processes likely() put aside (call it once likely() is exhausted)."""
        return [*self._rest[0], *self._rest[1]]


class Rotation:
    """Every known process has a slot; each step hands out the next slot's processes.

    A process goes to the slot with the least work (what reading it cost last
    time, `weigh`), not to a slot by pid number, which would put processes
    started together, often alike (a pool of workers with thousands of
    connections each), in one tick.
    """

    __slots__ = ("_load", "_next", "_slot_of", "_slots", "_weight", "steps", "ticks")

    def __init__(self, ticks: int) -> None:
        self.ticks = max(1, ticks)
        self._slots: list[set[int]] = [set() for _ in range(self.ticks)]
        self._slot_of: dict[int, int] = {}
        self._weight: dict[int, int] = {}  # pid -> its cost when last read
        self._load = [0] * self.ticks  # the sum of the weights in each slot
        self._next = 0
        self.steps = 0

    def weigh(self, pid: int, links: int) -> None:
        """Reading `pid` cost `links` fd links (its slot is chosen now if it has none)."""
        cost = links + PID_COST
        slot = self._slot_of.get(pid)
        if slot is None:
            slot = min(range(self.ticks), key=self._load.__getitem__)
            self._slot_of[pid] = slot
            self._slots[slot].add(pid)
            self._load[slot] += cost
        else:
            self._load[slot] += cost - self._weight[pid]
        self._weight[pid] = cost

    def forget(self, pid: int) -> None:
        slot = self._slot_of.pop(pid, None)
        if slot is not None:
            self._slots[slot].discard(pid)
            self._load[slot] -= self._weight.pop(pid)

    def step(self) -> set[int]:
        """The processes whose turn it is now."""
        slot = self._next
        self._next = (slot + 1) % self.ticks
        self.steps += 1
        return set(self._slots[slot])

    def thorough(self) -> bool:
        """The last step belongs to a round that reads every process whole, whatever its fd count
        says: one in THOROUGH_ROUNDS (not the first: the first update has just read them all)."""
        return (self.steps - 1) // self.ticks % THOROUGH_ROUNDS == THOROUGH_ROUNDS - 1

    def load(self) -> list[int]:
        """The work in each slot (for tests)."""
        return list(self._load)
