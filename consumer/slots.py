"""A worker process's execution slots, shared by its readers of every requests stream, and the rule by
which the priority lanes share them.

The rule: whenever slots are free, they go to the lanes that have runs waiting, one slot at a time, each
to the lane whose next start would finish first on a clock where a lane's start costs 1/weight
(start-time fair queuing, as network schedulers share a link). With the default weights
(`NOVA_LANE_WEIGHTS=high:4,normal:2,low:1`) and all three lanes busy, every 7 starts are 4 high, 2
normal and 1 low, in the order high, high, normal, high, high, normal, low; ties go to the higher lane.
So higher lanes drain first and no lane starves: a low run waits behind at most 6 others per slot of
the process, however long the high backlog. A lane with nothing waiting is skipped and its share goes
to the others; when it has runs again it joins at the current clock, with no credit saved up while it
was idle (it cannot then take every slot for a while). Slots a lane was given but did not use (its
stream turned out empty) are handed back and the clock with them, so only real starts count.

Each worker process applies the rule to its own slots; across processes, every free slot anywhere
follows it, so a backlog in several lanes is shared the same way overall.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from shared.lanes import LANES, Lane


class SlotBudget:
    """NOVA_CONCURRENCY slots shared by a process's readers (one per shard and lane). A reader reserves
    slots for one read and hands back what it did not fill, so readers of several streams never start
    more runs together than the process has slots."""

    def __init__(self, concurrency: int, readers: int = 1, weights: Mapping[Lane, int] | None = None) -> None:
        self.concurrency = concurrency
        self.readers = readers
        self.used = 0
        self.reserved = 0
        # Slots allotted to a lane and not yet reserved by one of its readers.
        self.granted: dict[Lane, int] = dict.fromkeys(LANES, 0)
        self.freed = asyncio.Event()
        weights = weights or dict.fromkeys(LANES, 1)
        self._cost = {lane: 1 / weights[lane] for lane in LANES}
        # Each lane's virtual start time: when its next start begins on the shared clock.
        self._start = dict.fromkeys(LANES, 0.0)
        self._clock = 0.0
        # The readers of each lane that have runs waiting, as far as they know.
        self._waiting: dict[Lane, set[str]] = {lane: set() for lane in LANES}

    @property
    def free(self) -> int:
        """Slots neither running, nor reserved for a read, nor allotted to a lane."""
        return self.concurrency - self.used - self.reserved - sum(self.granted.values())

    def take(self) -> None:
        self.used += 1

    def give(self) -> None:
        self.used -= 1
        self.freed.set()

    def reserve(self, lane: Lane = Lane.NORMAL, reader: str = "") -> int:
        """Slots for one read by `reader` of a `lane` stream: the lane's share of the free slots. The
        reader counts as having runs waiting until it says otherwise (`idle`)."""
        self._set_waiting(lane, reader, True)
        self._allot()
        n = self.granted[lane]
        self.granted[lane] = 0
        self.reserved += n
        return n

    def unreserve(self, n: int, lane: Lane = Lane.NORMAL, unused: int | None = None) -> None:
        """End a read that reserved `n` slots; `unused` of them (default all) started nothing and go back,
        with the lane's turn on the clock."""
        self.reserved -= n
        unused = n if unused is None else unused
        if unused:
            self._start[lane] -= unused * self._cost[lane]
            self.freed.set()

    def register(self, lane: Lane, reader: str) -> None:
        """A reader of a `lane` stream: until its first read says otherwise, its stream may have runs
        waiting (so that at start the lanes share the slots by the rule, whichever reader runs first)."""
        self._set_waiting(lane, reader, True)

    def idle(self, lane: Lane, reader: str) -> None:
        """`reader` found its stream empty: its lane gets no slots for it until it reserves again. Slots
        allotted to the lane meanwhile go back, with its turn, once none of its readers has runs waiting."""
        self._set_waiting(lane, reader, False)
        if not self._waiting[lane] and (n := self.granted[lane]):
            self.granted[lane] = 0
            self._start[lane] -= n * self._cost[lane]
            self.freed.set()

    def _set_waiting(self, lane: Lane, reader: str, waiting: bool) -> None:
        readers = self._waiting[lane]
        if waiting and not readers:
            # Joining at the current clock: idle time earns no credit.
            self._start[lane] = max(self._start[lane], self._clock)
        if waiting:
            readers.add(reader)
        else:
            readers.discard(reader)

    def _allot(self) -> None:
        busy = [lane for lane in LANES if self._waiting[lane]]
        if not busy:
            return
        for _ in range(max(self.free, 0)):
            # The lane whose next start finishes first; `min` keeps the first (highest) lane on a tie.
            lane = min(busy, key=lambda b: self._start[b] + self._cost[b])
            self._clock = max(self._clock, self._start[lane])
            self._start[lane] += self._cost[lane]
            self.granted[lane] += 1
        # Readers of other lanes may be waiting for slots this allotment gave them.
        if any(self.granted[lane] for lane in busy):
            self.freed.set()
