"""The fork server (consumer/sandbox/zygote.py): what it adds to the attacks of test_sandbox_attacks.py,
which run against it too. Node code is hostile; the zygote is killed as a crash would."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from consumer.sandbox import local
from consumer.sandbox.base import NodeError, SandboxInfraError, SandboxSpec
from consumer.sandbox.local import LocalSandbox, LocalSandboxProvider
from shared.settings import Settings
from tests.support import create_workflow, enqueue, linear, process_alive, start_worker_process
from tests.test_sandbox_attacks import processes_of


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "the fork server needs the worker to run as root"
    probe = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="none", sandbox_launch="fork"))
    if probe.launcher != "fork server" or not probe.isolation.complete:
        return f"the fork server cannot run here: {probe.fork_why}"
    return None


_WHY_NOT = _why_not()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")


@pytest.fixture
async def provider() -> AsyncIterator[LocalSandboxProvider]:
    p = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="none", sandbox_launch="fork"))
    await p.start()
    yield p
    await p.aclose()


async def open_box(provider: LocalSandboxProvider, execution_id: int, client: str = "acme") -> LocalSandbox:
    return await provider.open(SandboxSpec(execution_id=execution_id, client=client))


async def assert_runs_a_node(provider: LocalSandboxProvider, execution_id: int) -> None:
    """A sandbox of the provider opens, runs a node, and closes."""
    sb = await open_box(provider, execution_id)
    try:
        assert (await sb.run_action("n", "context['x'] = 1", {}, 10)).context == {"x": 1}
    finally:
        await sb.close()


def _gone(pid: int) -> bool:
    try:
        return "State:\tZ" in open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return True


LOOK = """
import os
fds = {}
for fd in os.listdir('/proc/self/fd'):
    try:
        fds[fd] = os.readlink(f'/proc/self/fd/{fd}')
    except OSError:
        pass
status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())
context.update(
    pid=os.getpid(), fds=fds, dev=sorted(os.listdir('/dev')), net=os.readlink('/proc/self/ns/net'),
    cap_eff=status['CapEff'].strip(), cap_prm=status['CapPrm'].strip(), no_new_privs=status['NoNewPrivs'].strip(),
    groups=status['Groups'].strip(), uid=os.getuid(), gid=os.getgid(),
)
"""


async def test_a_sandbox_holds_no_privilege_and_nothing_of_the_zygotes(provider: LocalSandboxProvider) -> None:
    sb = await open_box(provider, 1)
    try:
        seen = (await sb.run_action("look", LOOK, {}, 10)).context
    finally:
        await sb.close()
    assert sb.lease is None  # released at close: it was leased while the sandbox lived
    # The runner is PID 1 of its own namespace: no init beside it (one copy of the zygote fewer per sandbox),
    # and whatever it starts dies with it.
    assert seen["pid"] == 1
    # Its own uid and gid, no supplementary group, no capability, no way to gain one.
    assert seen["uid"] == seen["gid"] and seen["uid"] >= 200_000 and seen["groups"] == ""
    assert int(seen["cap_eff"], 16) == 0 and int(seen["cap_prm"], 16) == 0 and seen["no_new_privs"] == "1"
    # Descriptors: /dev/null on 0-2, the protocol's two pipes, the one listdir had open; no socket (the
    # zygote's control socket), no other sandbox's pipe.
    kinds = sorted(target.split(":")[0] if ":" in target else target for target in seen["fds"].values())
    assert len(seen["fds"]) <= 6 and not any(k == "socket" for k in kinds), seen["fds"]
    assert sum(k == "pipe" for k in kinds) == 2, seen["fds"]
    # A minimal /dev: no disk, no kmsg, nothing of the host's but these.
    assert set(seen["dev"]) <= {"null", "zero", "full", "random", "urandom", "tty", "shm", "pts", "fd", "stdin",
                                "stdout", "stderr"}, seen["dev"]  # fmt: skip


async def test_live_sandboxes_never_share_a_network_namespace(provider: LocalSandboxProvider) -> None:
    boxes = [await open_box(provider, i) for i in range(3)]
    try:
        nets = [(await b.run_action("n", LOOK, {}, 10)).context["net"] for b in boxes]
    finally:
        for b in boxes:
            await b.close()
    assert len(set(nets)) == 3 and os.readlink("/proc/self/ns/net") not in nets


async def test_node_code_cannot_undo_its_mounts(provider: LocalSandboxProvider) -> None:
    code = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
context['umount'] = libc.umount2(b'/tmp', 2) == 0 or ctypes.get_errno()
context['remount'] = libc.mount(None, b'/', None, 0x20 | 0x1000, None) == 0 or ctypes.get_errno()
"""
    sb = await open_box(provider, 1)
    try:
        seen = (await sb.run_action("mounts", code, {}, 10)).context
    finally:
        await sb.close()
    assert seen == {"umount": 1, "remount": 1}  # EPERM both: no CAP_SYS_ADMIN left


async def test_a_killed_zygote_takes_its_sandboxes_along_and_is_started_again(
    provider: LocalSandboxProvider,
) -> None:
    assert provider.forkserver is not None and provider.forkserver.pid is not None
    first_zygote = provider.forkserver.pid
    sb = await open_box(provider, 1)
    assert sb.lease is not None
    uid = sb.lease.uid
    await sb.run_action(
        "escape", "import os\nif os.fork() == 0:\n    os.setsid()\n    import time; time.sleep(300)", {}, 10
    )
    os.kill(first_zygote, signal.SIGKILL)
    # The kill lands when the kernel gets to it: wait (generously) for the sandbox's init to be gone.
    for _ in range(3000):
        if _gone(sb.pid):
            break
        await asyncio.sleep(0.01)
    # The node after it finds its sandbox gone: a crash of that node, not a hang.
    with pytest.raises(NodeError) as info:
        await sb.run_action("next", "context['x'] = 1", {}, 10)
    assert info.value.reason == "crashed", info.value
    await sb.close()
    assert processes_of(uid) == []
    again = await open_box(provider, 2)
    try:
        assert (await again.run_action("n", "context['x'] = 1", {}, 10)).context == {"x": 1}
        assert provider.forkserver.pid not in (None, first_zygote)
    finally:
        await again.close()


def _reaped_cpu_seconds(pid: int) -> float:
    """CPU of the children a process has waited for (its own reaped children and what they reaped)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


async def test_a_closed_sandboxs_runner_is_counted_in_the_zygotes_reaped_cpu(provider: LocalSandboxProvider) -> None:
    # The runner of a closed sandbox is the zygote's child, reaped by it, so its CPU shows in the zygote's
    # reaped time, where the benchmarks and the cost model read it. (Killed through an init of its
    # namespace, a runner was reaped by the kernel as the namespace ended, and counted nowhere.)
    assert provider.forkserver is not None and provider.forkserver.pid is not None
    zygote = provider.forkserver.pid
    burn = "import os, time\nt = time.process_time()\nwhile time.process_time() - t < 0.3:\n    pass\nt = os.times()\n"
    burn += "context['cpu'] = t.user + t.system"
    sb = await open_box(provider, 1)
    before = _reaped_cpu_seconds(zygote)
    try:
        runner_cpu = (await sb.run_action("burn", burn, {}, 10)).context["cpu"]
    finally:
        await sb.close()
    assert runner_cpu >= 0.2  # os.times counts in clock ticks
    # Reaped once the zygote has seen it go (it reports the exit before the close returns).
    assert _reaped_cpu_seconds(zygote) - before >= runner_cpu - 0.02


async def test_an_idle_sandboxs_close_kills_its_runner_at_once(provider: LocalSandboxProvider) -> None:
    # Its CPU is counted however it ends (above), so the close waits for nothing node code could hold up
    # (a runner left to exit by itself could be made to ignore the end of its requests): it kills.
    sb = await open_box(provider, 1)
    assert (await sb.run_action("n", "context['x'] = 1", {}, 10)).context == {"x": 1}
    await sb.close()
    assert sb.proc.returncode == -signal.SIGKILL


async def test_a_run_cancelled_in_a_node_is_killed_at_its_close_not_left_to_exit(
    provider: LocalSandboxProvider,
) -> None:
    # A node still running when the run was cancelled (revoked, the worker stopping) must not go on with
    # its side effects after the cancel was reported.
    sb = await open_box(provider, 1)
    call = asyncio.create_task(sb.run_action("slow", "import time\ntime.sleep(30)", {}, 60))
    await asyncio.sleep(0.2)
    call.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await call
    assert sb.dead
    await sb.close()
    assert sb.proc.returncode is not None and sb.proc.returncode != 0


async def test_without_a_pid_namespace_what_node_code_started_dies_at_close() -> None:
    # The fork server without isolation (NOVA_SANDBOX_LAUNCH=plain): no PID namespace takes node code's
    # processes with it, so the close kills the sandbox's process group at once, runner and all.
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_launch="plain"))
    try:
        sb = await open_box(provider, 1)
        started = "import subprocess\ncontext['pid'] = subprocess.Popen(['sleep', '60']).pid"
        pid = (await sb.run_action("bg", started, {}, 10)).context["pid"]
        await sb.close()
        deadline = asyncio.get_running_loop().time() + 10
        while process_alive(pid):
            assert asyncio.get_running_loop().time() < deadline, f"node code's process {pid} outlived its sandbox"
            await asyncio.sleep(0.05)
    finally:
        await provider.aclose()


async def test_auto_falls_back_to_bwrap_where_the_fork_server_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # A kernel without mount_setattr (before 5.12), as the probe reports it there.
    why = "the fork server cannot run here: mount_setattr: Function not implemented"
    monkeypatch.setattr(local, "probe_fork_server", lambda *args: why)
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="none"))
    try:
        assert provider.launcher == "bubblewrap" and provider.forkserver is None
        assert why in provider.statement()[0] and provider.isolation.complete
        sb = await open_box(provider, 1)
        try:
            assert (await sb.run_action("n", "import os\ncontext['p'] = os.getpid()", {}, 10)).context["p"] <= 2
        finally:
            await sb.close()
    finally:
        await provider.aclose()


async def test_plain_mode_says_it_isolates_nothing() -> None:
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_launch="plain"))
    try:
        assert not provider.isolation.complete and provider.cgroups is None and not provider.separate_uids
        assert "plain processes" in provider.statement()[0]
        await assert_runs_a_node(provider, 1)
    finally:
        await provider.aclose()


# Children that together pass the sandbox's memory limit, each under the per-process one: the kernel's
# OOM killer (counted in the cgroup) ends one of them.
HOG = """
import os, time
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = bytearray(120 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(1)
        os._exit(0)
    children.append(pid)
for pid in children:
    os.waitpid(pid, 0)
"""


async def test_a_reused_cgroup_does_not_blame_the_next_sandbox_for_an_old_oom_kill() -> None:
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_launch="fork"), memory_limit_mb=256)
    try:
        hog = await open_box(provider, 1)
        assert hog.cgroup is not None
        group = hog.cgroup
        with contextlib.suppress(NodeError):  # the runner itself may be the one killed
            await hog.run_action("hog", HOG, {}, 20)
        assert group.oom_kills() > 0
        await hog.close()
        after = await open_box(provider, 2)
        try:
            assert after.cgroup is group  # the same group, reused
            with pytest.raises(NodeError) as info:
                await after.run_action("quit", "import os\nos._exit(3)", {}, 10)
            assert info.value.type == "SandboxCrashed" and "status 3" in info.value.message, info.value
        finally:
            await after.close()
    finally:
        await provider.aclose()


def _descendants(root: int) -> dict[int, int]:
    """pid -> parent pid of every live process below `root`."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] != "Z":
                    parents[int(entry.name)] = int(stat[1])
    found: dict[int, int] = {}
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier and pid not in found}
        found.update({pid: parents[pid] for pid in frontier})
    return found


async def test_a_worker_killed_with_sigkill_leaves_no_zygote_and_no_sandbox(
    settings: Settings, redis: Redis, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    # The node leaves a daemonised grandchild and then sleeps: worker, zygote, runner, grandchild.
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(300)\ntime.sleep(300)"
    wf = await create_workflow(redis, settings, pool, linear(code))
    await enqueue(redis, settings, wf)
    worker = start_worker_process(settings, tmp_path / "worker.log", NOVA_SANDBOX_LAUNCH="fork")
    try:
        tree: dict[int, int] = {}
        for _ in range(6000):  # a minute, in hundredths
            tree = _descendants(worker.pid)
            if len(tree) >= 3 and max(_depth(tree, pid, worker.pid) for pid in tree) >= 3:
                break
            await asyncio.sleep(0.01)
        assert max(_depth(tree, pid, worker.pid) for pid in tree) >= 3, (tree, (tmp_path / "worker.log").read_text())
    finally:
        os.kill(worker.pid, signal.SIGKILL)  # the worker alone: the zygote and sandboxes have sessions of their own
        worker.wait()
    for _ in range(3000):
        left = [pid for pid in tree if not _gone(pid)]
        if not left:
            break
        await asyncio.sleep(0.01)
    assert left == [], left


def _depth(tree: dict[int, int], pid: int, root: int) -> int:
    depth = 0
    while pid != root and pid in tree:
        pid, depth = tree[pid], depth + 1
    return depth


async def test_without_an_own_uid_the_sandbox_is_root_without_any_capability() -> None:
    # An interpreter other users cannot run (a virtualenv under /root): sandboxes keep the worker's uid.
    settings = Settings(sandbox_pool_size=0, sandbox_launch="fork", sandbox_python=sys.executable)
    provider = LocalSandboxProvider(settings)
    if provider.separate_uids:
        pytest.skip(f"{sys.executable} is usable by other users here: sandboxes get their own uids")
    code = (
        LOOK
        + """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
context['umount'] = libc.umount2(b'/tmp', 2) == 0 or ctypes.get_errno()
status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())
context['cap_bnd'] = status['CapBnd'].strip()
try:
    open('/proc/sys/kernel/hostname', 'w').write('owned')
    context['sysctl'] = 'written'
except OSError as exc:
    context['sysctl'] = type(exc).__name__
"""
    )
    try:
        assert "sandboxes share the worker's uid" in "\n".join(provider.statement())
        sb = await open_box(provider, 1)
        try:
            seen = (await sb.run_action("look", code, {}, 10)).context
        finally:
            await sb.close()
    finally:
        await provider.aclose()
    assert seen["uid"] == 0 and int(seen["cap_eff"], 16) == 0 and int(seen["cap_bnd"], 16) == 0, seen
    assert seen["umount"] == 1 and seen["sysctl"] in ("OSError", "PermissionError"), seen


async def test_a_start_failing_after_the_fork_leaves_no_pipe_end_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    # A sandbox start that fails while the pipes' transports are being made (a cancelled pool refill, an
    # error): each end must be closed once, by its owner. The worker closed the raw numbers while a read
    # transport still watched one: the loop went on watching a closed number, and the next file to get
    # it was read, then closed, by a dead transport (seen as "Bad file descriptor" when it was collected).
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_insecure=True))
    await provider.start()
    loop = asyncio.get_running_loop()
    selector = getattr(loop, "_selector", None)
    if provider.forkserver is None or selector is None:
        await provider.aclose()
        pytest.skip("needs the fork server and a selector event loop, whose watched files can be listed")

    async def refused(*args: object, **kwargs: object) -> None:
        raise OSError("no write pipe (injected)")

    watched = set(selector.get_map())
    monkeypatch.setattr(loop, "connect_write_pipe", refused)
    try:
        with pytest.raises(SandboxInfraError):
            await provider.open(SandboxSpec(execution_id=1, client="c"))
    finally:
        monkeypatch.undo()
        await asyncio.sleep(0.1)  # a transport's close completes on the loop
        left = set(selector.get_map()) - watched
        await provider.aclose()
    assert not left, f"the loop still watches {sorted(left)} after the failed start"


def test_under_uvloop_no_sandbox_pipe_is_closed_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    """`nova worker` runs on uvloop, whose pipe transports hand the file's number to libuv, which closes
    it, and then close the file object as well: a second close of a number another thread may have been
    given meanwhile (seen: a netns slot's setns failing with EINVAL, a pipe with EBADF). Each file a
    sandbox's pipes are made from is checked as it is closed: the number must still be its own."""
    import io

    import uvloop

    closed_twice: list[int] = []

    class Probe(io.FileIO):
        def close(self) -> None:
            if not self.closed and self.closefd:
                try:
                    os.fstat(self.fileno())
                except OSError:
                    closed_twice.append(self.fileno())
            super().close()

    def probe(fd: int, mode: str = "r", buffering: int = -1, closefd: bool = True) -> io.FileIO:
        assert buffering == 0
        return Probe(fd, mode.replace("b", ""), closefd=closefd)

    monkeypatch.setattr(os, "fdopen", probe)

    async def main() -> None:
        provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="none", sandbox_launch="fork"))
        await provider.start()
        try:
            for i in range(3):
                box = await open_box(provider, i)
                assert (await box.run_action("n", "context['n'] = 1", {}, 10)).context == {"n": 1}
                await box.close()
            await asyncio.sleep(0.05)  # the transports' closes complete on the loop
        finally:
            await provider.aclose()

    uvloop.run(main())
    assert closed_twice == []


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_opens_cancelled_at_every_step_leak_no_descriptor_and_close_none_twice(loop_kind: str) -> None:
    # An open cancelled while the worker connects the sandbox's pipes to its loop: under uvloop libuv owns
    # a pipe's number once it is handed over and closes it itself when the connect fails, so closing it
    # again would close whatever took that number meanwhile (another sandbox's pipe, a Redis socket), or
    # fail. Each open is cancelled one loop pass later than the last, counted from the zygote's answer (the
    # pipes are connected in the passes right after it, with no wait between). A descriptor opened before
    # must stay open, none may be left behind, and the provider still opens sandboxes after.
    async def main() -> None:
        provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="none", sandbox_launch="fork"))
        await provider.start()
        forkserver = provider.forkserver
        assert forkserver is not None
        try:
            warm = await open_box(provider, 0)  # the zygote started, its socket open
            await warm.close()
            bystander = os.open(os.devnull, os.O_RDONLY)
            before = _open_fds()
            for passes in range(16):
                forkserver._pending = None
                opening = asyncio.ensure_future(open_box(provider, passes + 1))
                for _ in range(1_000_000):  # loop passes until the zygote has answered
                    if forkserver._pending is not None and forkserver._pending.done():
                        break
                    await asyncio.sleep(0)
                for _ in range(passes):
                    await asyncio.sleep(0)
                opening.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    sandbox = await opening
                    await sandbox.close()  # it finished before the cancel landed
            # What a cancelled open left is closed by the zygote's exit reports: let them arrive.
            for _ in range(300):
                if _open_fds() <= before:
                    break
                await asyncio.sleep(0.01)
            assert os.fstat(bystander) is not None  # still ours: nothing closed it a second time
            assert _open_fds() <= before, sorted(_open_fds() - before)
            os.close(bystander)
            await assert_runs_a_node(provider, 100)
        finally:
            await provider.aclose()

    if loop_kind == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


async def test_a_node_at_the_cpu_limit_fails_as_over_it_not_as_a_crash() -> None:
    # The kernel ends a runner at RLIMIT_CPU with SIGKILL (soft and hard limits are equal): reported as any
    # kill ("crashed") before the zygote sent the runner's CPU with its exit.
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="none", sandbox_launch="fork"),
                                    cpu_seconds=1)  # fmt: skip
    try:
        sb = await open_box(provider, 1)
        with pytest.raises(NodeError) as info:
            await sb.run_action("burn", "while True:\n    pass", {}, 120)
        await sb.close()
    finally:
        await provider.aclose()
    exit_seen = (sb.proc.returncode, getattr(sb.proc, "cpu_seconds", None))
    assert (info.value.type, info.value.reason) == ("CPUTimeLimitExceeded", "limit:cpu"), (info.value, exit_seen)
