"""The cost model: CPU per execution for each role, read from /proc, and the capacity it projects.

Each role's CPU is the sum over its whole process tree (the API, a worker with its sandboxes, Redis,
PostgreSQL with its backends): user + system time of every live process plus the time of the children
each has waited for, so a sandbox that came and went between two readings is still counted. Two
readings around one run, divided by the executions it did, give CPU seconds per execution per role.
Those costs are taken while a backlog is drained (the rate the projection is about): at a paced low rate
each read and each projector batch carries fewer executions, and the same work costs more per execution.

From those figures, a throughput is projected for N worker processes on C cores:

    X(N) = min(N / (w + r), 1 / r, N * J, C / (w + r + p + a + w * R / N))

with w, r, p, a the worker's, Redis's, PostgreSQL's and the API's CPU per execution. A worker process and
Redis each use at most one core (one event loop, one main thread), and all of them share the C cores.
A worker process also waits for Redis's work on its own runs: it reads up to its concurrency's worth of
requests, runs them, and sends their writes in one batch, which all of them then wait on, so little of
its own work overlaps Redis's on them (its projector's, a share of w, does). Each process is then a loop
of w on its core and r on Redis's, N / (w + r) for N of them. (Before this term, X(1) was 24% over the
measured run at w = 0.26 ms; at w = 0.18 ms, 34%: the wait counts for more the cheaper the run.)
J is the most executions per second one projector writes to PostgreSQL (each worker process has its
own): a serial stage, each batch waiting on PostgreSQL and then on the projector's loop, so it is
measured, not derived from CPU: a projector alone draining a backlog, less the time its and its
PostgreSQL backends' threads waited for a core (on a machine of its own, as the other terms are).
R is the mean number of other runnable threads on the machine (other programs, the load generator):
the scheduler gives each runnable thread the same share of the cores, so while the N busy workers get
X * w of CPU per second, R competing threads take X * w * R / N. On a machine of its own R = 0, and
the formula is the plain CPU budget; that is the capacity to plan with.

R is read from the scheduler, not fitted: the machine's mean count of runnable threads, sampled from
/proc/loadavg (`RunQueue`), less the time the run's own processes were runnable or waiting to run
(their threads' /proc/<pid>/task/<tid>/schedstat, `scheduled_seconds`), less the sampling thread itself.
The bench compares X(1) and X(2) with measured runs on the same machine.

Left out, and so the rest of the error: a worker is not runnable all the time beyond its wait on Redis
(a run's start; and its projector, which shares the worker's event loop, falls behind the runs while they
go on and writes the last batches alone, waiting on PostgreSQL), which makes X too high when few threads
compete; a worker got 1.1-1.4
times an equal share beside the other threads in exploratory runs (likely: the kernel's autogroups share
first between sessions, and a thread that often blocks is favoured when it wakes), which makes X too low
when many do; and w grows a little with N. Not counted at all: a process reaped by the kernel instead of
a parent, which is what a PID namespace's init's last children are (PID 1 ignores SIGCHLD while its
namespace ends): a fork server sandbox's runner killed through its init (a timeout, a failure). A sandbox
closed after its work lets its runner exit first, reaped and counted by its init (consumer/sandbox/local.py).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat from its third field on (raises FileNotFoundError when the process is gone)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def user_system_seconds(pid: int) -> tuple[float, float]:
    """A process's user and system CPU so far, apart: what its Python costs, and what its system calls do."""
    fields = _stat_fields(pid)
    return int(fields[11]) / _TICKS, int(fields[12]) / _TICKS


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and of the children it waited for), or None if gone."""
    try:
        fields = _stat_fields(pid)
    except (FileNotFoundError, ProcessLookupError):
        return None
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + stime + cutime + cstime) / _TICKS


def _process_table() -> dict[int, tuple[int, float]]:
    """Every live process: pid -> (parent pid, CPU seconds)."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            table[int(entry)] = stat
    return table


def _descendants(roots: Iterable[int], table: Mapping[int, tuple[int, float]] | None = None) -> set[int]:
    """The live processes among `roots` and all their live descendants."""
    table = _process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    seen: set[int] = set()
    todo = [p for p in roots if p in table]
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo.extend(children.get(pid, ()))
    return seen


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    """CPU seconds used so far by the processes `roots` and all their live descendants."""
    table = _process_table()
    return sum(table[pid][1] for pid in _descendants(roots, table))


@dataclass
class RoleClock:
    """Readings of the CPU used by each role's process trees."""

    roles: Mapping[str, list[int]]

    def read(self) -> dict[str, float]:
        return {role: tree_cpu_seconds(pids) for role, pids in self.roles.items()}


def per_execution_ms(before: Mapping[str, float], after: Mapping[str, float], executions: int) -> dict[str, float]:
    return {role: (after[role] - before[role]) * 1000 / executions for role in before}


def projected_throughput(
    cost_ms: Mapping[str, float],
    workers: int,
    cores: int,
    competing: float = 0.0,
    projector_exec_s: float = float("inf"),
) -> float:
    """Executions per second the per-execution costs allow for `workers` worker processes on `cores`,
    beside `competing` other runnable threads (the module's formula; 0 on a machine of its own), each
    worker with its projector, which carries at most `projector_exec_s` alone."""
    w, r = cost_ms["worker"], cost_ms["redis"]
    # Every competing thread gets as much CPU as one busy worker: w / N per execution each.
    budget = sum(cost_ms.values()) + w * competing / workers
    # Each worker process waits on Redis's share of its own batches (the module's doc): a loop of w + r.
    return min(workers * 1000 / (w + r), 1000 / r, workers * projector_exec_s, cores * 1000 / budget)


def capacity(cost_ms: Mapping[str, float]) -> dict[str, float]:
    """What one core of each role carries, and how many worker processes one Redis core serves: each
    carries 1 / (w + r) at most (it waits on Redis's share of its batches: the module's doc), Redis 1 / r."""
    out = {f"{role}_exec_s_per_core": 1000 / ms for role, ms in cost_ms.items() if ms > 0}
    out["workers_per_redis"] = (cost_ms["worker"] + cost_ms["redis"]) / cost_ms["redis"]
    return out


def scheduled_seconds(roots: Iterable[int]) -> tuple[float, float]:
    """Seconds the threads of `roots` and their live descendants have run, and have waited to run, so
    far (the first two fields of each thread's schedstat). Over a run's wall time, their sum is the
    mean count of its runnable threads, and ran / (ran + waited) the share of a core they got."""
    ran = waited = 0
    for pid in _descendants(roots):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    fields = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
                    ran, waited = ran + int(fields[0]), waited + int(fields[1])
    return ran / 1e9, waited / 1e9


def competing_threads(machine_runnable: float, own_runnable: float) -> float:
    """Other runnable threads, on average: the machine's mean count (which includes the sampling thread,
    running as it reads) less the run's own processes'."""
    return max(0.0, machine_runnable - 1 - own_runnable)


class RunQueue:
    """Samples the machine's count of runnable threads (/proc/loadavg) every `interval` seconds from a
    thread of its own, while used as a context manager; `mean` is their average."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            # Fourth field: runnable/total scheduling entities.
            self.samples.append(int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]))
            time.sleep(self.interval)

    def __enter__(self) -> RunQueue:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0
