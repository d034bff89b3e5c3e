"""Where a local sandbox's CPU goes, process by process: `python -m bench.sandbox_split [LAUNCH] [NETWORK]`.

Opens, runs one action in, and closes 100 sandboxes in this process (no Redis, no PostgreSQL) and prints
CPU milliseconds per sandbox of the worker side (this process), of the processes it reaped itself (bwrap
and its interpreter), of the zygote alone, and of the zygote with the sandboxes it reaped, and the minor
page faults of the zygote and of its sandboxes (init and runner); from /proc.
LAUNCH is a NOVA_SANDBOX_LAUNCH value (fork, bwrap, plain), NETWORK egress or none.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from consumer.sandbox.base import SandboxSpec
from consumer.sandbox.local import LocalSandboxProvider
from shared.settings import Settings

N = 100


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _cpu_ms(pid: int, children: bool) -> float:
    fields = _stat(pid)
    return sum(int(v) for v in fields[11:13] + (fields[13:15] if children else [])) * 1000 / os.sysconf("SC_CLK_TCK")


def _faults(pid: int) -> tuple[int, int]:
    """Minor page faults of a process and of the children it reaped: after a fork, most are copies of
    pages the parent and child shared until one of them wrote (the bulk of a forked sandbox's cost)."""
    fields = _stat(pid)
    return int(fields[7]), int(fields[8])


async def main(launch: str, network: str) -> None:
    settings = Settings(sandbox_pool_size=0, sandbox_launch=launch, sandbox_network=network, sandbox_insecure=True)
    provider = LocalSandboxProvider(settings)  # type: ignore[arg-type]
    await provider.start()

    async def one(i: int) -> None:
        sandbox = await provider.open(SandboxSpec(execution_id=i, client="bench"))
        await sandbox.run_action("n", "context['x'] = 1", {}, 10)
        await sandbox.close()

    for i in range(5):  # warm
        await one(i)
    await asyncio.sleep(0.3)
    zygote = provider.forkserver.pid if provider.forkserver is not None else None

    def sample() -> tuple[float, float, float, float, float, float]:
        t = os.times()
        zyg = (_cpu_ms(zygote, False), _cpu_ms(zygote, True), *_faults(zygote)) if zygote else (0.0,) * 4
        return (t.user + t.system) * 1000, (t.children_user + t.children_system) * 1000, *zyg

    before, t0 = sample(), time.perf_counter()
    for i in range(N):
        await one(i)
    wall = time.perf_counter() - t0
    await asyncio.sleep(0.3)  # the last sandbox reaped
    after = sample()
    await provider.aclose()
    worker, reaped, zyg, zyg_all, zyg_faults, sandbox_faults = ((a - b) / N for a, b in zip(after, before, strict=True))
    print(
        f"{provider.launcher} ({launch}, {network}), per sandbox: worker {worker:.1f} ms, reaped by the worker "
        f"{reaped:.1f} ms, zygote {zyg:.1f} ms, zygote and its sandboxes {zyg_all:.1f} ms; "
        f"total {worker + reaped + zyg_all:.1f} ms; wall {wall * 1000 / N:.0f} ms; "
        f"page faults: zygote {zyg_faults:.0f}, its sandboxes {sandbox_faults:.0f}"
    )


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "fork", sys.argv[2] if len(sys.argv) > 2 else "egress"))
