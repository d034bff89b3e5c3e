"""The cost model: CPU per execution for each role, read from /proc, and the capacity it projects.

Each role's CPU is the sum over its whole process tree (the API, a worker with its sandboxes, Redis,
PostgreSQL with its backends): user + system time of every live process plus the time of the children
each has waited for, so a sandbox that came and went between two readings is still counted. Two
readings around one run, divided by the executions it did, give CPU seconds per execution per role.

From those figures, a throughput is projected for N worker processes on C cores:

    X(N) = min(N / w, 1 / r, C / (w + r + p + a))

with w, r, p, a the worker's, Redis's, PostgreSQL's and the API's CPU per execution: a worker process
and Redis each use at most one core (one event loop, one main thread), and all of them share C cores.
The bench compares X(1) and X(2) with measured runs on the same machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and of the children it waited for), or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + stime + cutime + cstime) / _TICKS


def tree_cpu_seconds(roots: Iterable[int]) -> float:
    """CPU seconds used so far by the processes `roots` and all their live descendants."""
    table: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            table[int(entry)] = stat
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, seen, todo = 0.0, set(), [p for p in roots if p in table]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += table[pid][1]
        todo.extend(children.get(pid, ()))
    return total


@dataclass
class RoleClock:
    """Readings of the CPU used by each role's process trees."""

    roles: Mapping[str, list[int]]

    def read(self) -> dict[str, float]:
        return {role: tree_cpu_seconds(pids) for role, pids in self.roles.items()}


def per_execution_ms(before: Mapping[str, float], after: Mapping[str, float], executions: int) -> dict[str, float]:
    return {role: (after[role] - before[role]) * 1000 / executions for role in before}


def projected_throughput(cost_ms: Mapping[str, float], workers: int, cores: int) -> float:
    """Executions per second the per-execution costs allow for `workers` worker processes on `cores`."""
    w, r = cost_ms["worker"], cost_ms["redis"]
    total = sum(cost_ms.values())
    return min(workers * 1000 / w, 1000 / r, cores * 1000 / total)


def capacity(cost_ms: Mapping[str, float]) -> dict[str, float]:
    """What one core of each role carries, and how many worker processes one Redis core serves."""
    out = {f"{role}_exec_s_per_core": 1000 / ms for role, ms in cost_ms.items() if ms > 0}
    out["workers_per_redis"] = cost_ms["worker"] / cost_ms["redis"]
    return out
