"""The local sandbox: node code in a separate, limited Python process per execution.

Each execution gets its own `python -I runner.py` process (consumer/sandbox/runner.py), with a scrubbed
environment, a fresh private working directory, resource limits (memory, CPU, open files, processes,
file size, output and context size) and its own process group, killed as a whole when the execution
ends. The process is reused for that execution's nodes, so imports and globals persist between them
(NOVA gave each node a fresh sandbox; this is a superset), and is never reused for another execution.

When the worker runs as root (containers), each sandbox process also runs under its own unprivileged
uid, so one execution cannot read another's directory or the worker's files, and the process limit
is enforced (Linux does not apply RLIMIT_NPROC to root). Without root every sandbox shares the
worker's uid: limits still apply, but isolation between executions is weaker; use E2B for that.

A warm pool keeps a few processes started ahead of need, so a node does not pay interpreter start-up.

How a sandbox process starts (NOVA_SANDBOX_LAUNCH): forked by the worker's fork server (zygote.py, with
forkserver.py its client here), which enters the namespaces, cgroup and uid itself; or, where that cannot
run, through bubblewrap and a fresh interpreter (isolation.py). The worker's start-up lines say which.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import ctypes.util
import hashlib
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson

from consumer.sandbox.base import NodeError, SandboxInfraError, SandboxSpec
from consumer.sandbox.forkserver import ForkedProcess, ForkServer, probe_fork_server
from consumer.sandbox.isolation import (
    CgroupRoot,
    FlockLease,
    Isolation,
    SandboxCgroup,
    bwrap_args,
    find_bwrap,
    install_egress_filter,
    probe_bwrap,
)
from consumer.sandbox.netns import EgressNetworks, NetSlot
from consumer.sandbox.runner_client import BadReply, RunnerSandbox, decode_reply, max_reply_bytes, oversized_reply
from consumer.sandbox.seccomp import compiled as compiled_seccomp
from shared.settings import Settings

log = logging.getLogger(__name__)

RUNNER = Path(__file__).with_name("runner.py")
_HEADER = struct.Struct(">I")
# Unprivileged uids handed to sandboxes when running as root; far above any real account.
_UID_BASE = 200_000
_UID_SPAN = 50_000
_UID_LOCKS = Path(tempfile.gettempdir()) / "nova-sandbox-uids"
# Work folders made on the host (sandboxes without namespaces) live here (mode 0711: traversable, not
# listable), as does the runner's copy, seen read-only by every bwrap sandbox.
_WORK_BASE = Path(tempfile.gettempdir()) / "nova-sandboxes"
# With the fork server (zygote.py) and bwrap a sandbox makes its work folder itself, on its own /tmp: the
# same path in every sandbox, private to each, counted as its memory, and nothing of it on the host.
_SANDBOX_WORKDIR = Path("/tmp/nova-sandbox")


def _sandbox_runner() -> Path:
    """runner.py where every sandbox can read it: a copy in the sandboxes' base folder.

    An install under /tmp (a CI checkout) is hidden by a sandbox's fresh /tmp, and the install's own
    folders may not be readable by a sandbox's uid; the base folder is visible in every mode. The copy is
    named by its content: the folder is the machine's, and workers of two releases on one host (a rolling
    deploy, two checkouts) must each run their own runner, not whichever wrote the folder last.
    """
    _WORK_BASE.mkdir(mode=0o711, exist_ok=True)
    source = RUNNER.read_bytes()
    target = _WORK_BASE / f"runner-{hashlib.sha256(source).hexdigest()[:16]}.py"
    if not target.exists() or target.read_bytes() != source:
        staged = _WORK_BASE / f".runner-{os.getpid()}.py"
        staged.write_bytes(source)
        staged.chmod(0o644)
        os.replace(staged, target)  # atomic: another worker may be reading it
    return target


class UidLease(FlockLease):
    """An exclusive uid for one sandbox, across every worker process on this machine. Released, it goes
    back to the worker's `KeptUids` (if it came from them and they are open), its lock still held."""

    def __init__(self, kept: KeptUids | None = None) -> None:
        super().__init__(_UID_LOCKS, _UID_BASE, _UID_SPAN, "sandbox uid")
        self._kept = kept

    @property
    def uid(self) -> int:
        return self.value

    def release(self) -> None:
        if self._kept is None or not self._kept.keep(self):
            super().release()


class KeptUids:
    """The uids a worker's sandboxes have released, their locks still held, handed to its next sandboxes
    before any other. A uid taken afresh is a random one of _UID_SPAN, whose lock file the machine most
    likely never made: creating it cost the worker 0.4 ms of CPU per sandbox (ext4), a tenth of the
    sandbox's whole cost.

    `keep` only where nothing of a sandbox can outlive it, as the next sandbox, another client's maybe,
    gets its uid at once: every process in a cgroup that emptied before the release, every file on the
    sandbox's own mounts. Writable folders (NOVA_SANDBOX_WRITABLE) keep files of its uid on the host, and
    without namespaces or cgroups so do /tmp, /dev/shm, IPC objects and setsid() daemons: there each
    sandbox takes a fresh uid, as before."""

    def __init__(self, *, keep: bool) -> None:
        self._free: list[UidLease] = []
        self._open = keep

    def take(self) -> UidLease:
        return self._free.pop() if self._free else UidLease(self)

    def keep(self, lease: UidLease) -> bool:
        """False when not kept (closed, or not keeping): the lease is then let go for good."""
        if self._open and not any(kept is lease for kept in self._free):
            self._free.append(lease)
        return self._open

    def close(self) -> None:
        self._open = False
        free, self._free = self._free, []
        for lease in free:
            lease.release()


_START_TIMEOUT = 30.0
# The kernel ends a runner at RLIMIT_CPU by its CPU time as sampled at ticks (a whole tick charged to
# whoever runs at it), while wait4 reports the exact run time: lower when the runner ran in slices shorter
# than a tick among other work. Measured: 0.87-0.95 s at a 1 s limit while the test suite ran beside it
# (1.0 on an idle machine, or beside busy loops). A runner SIGKILLed with at least this share of its limit
# used counts as stopped at the limit; other kills of it (node code's own) that late are taken so too.
_CPU_AT_LIMIT = 0.75
# Emptied sandbox cgroups a provider keeps for reuse.
_SPARE_CGROUPS = 8
# The reply reader's limit: asyncio reads a pipe ahead into memory until it holds twice this, which node
# code controls (a child of it can write between nodes, when no reply is awaited), outside any cgroup. A
# larger reply still arrives: readexactly resumes the paused pipe while it waits for the rest.
_READ_BUFFER = 1 << 20


class LocalSandbox(RunnerSandbox):
    def __init__(
        self,
        proc: asyncio.subprocess.Process | ForkedProcess,
        workdir: Path,
        max_context_bytes: int,
        lease: UidLease | None = None,
        max_output_bytes: int = 1 << 20,
        cgroup: SandboxCgroup | None = None,
        host_folder: Path | None = None,
    ) -> None:
        self.proc = proc
        self.cgroup = cgroup
        # Where an emptied cgroup goes (the provider keeps a few for the next sandboxes), else removed.
        self.recycle: Callable[[SandboxCgroup], Awaitable[None]] | None = None
        # Called once it is closed (the provider tops up its warm pool then, see open()).
        self.on_closed: Callable[[], None] | None = None
        # Started through bwrap: the exit status is bwrap's, which reports a signal as 128 + its number.
        self.wrapped = False
        self.workdir = workdir
        # The work folder the worker made on the host (no namespaces), removed at close; None when the
        # sandbox made its own (fork server, bwrap), which goes with its mount namespace.
        self.host_folder = host_folder
        self.lease = lease
        # With `egress` and the fork server: the network namespace lent to it, given back at close.
        self.net: NetSlot | None = None
        self.max_context_bytes = max_context_bytes
        self.max_output_bytes = max_output_bytes
        # The runner's CPU limit in seconds (RLIMIT_CPU), where its CPU is reported at its exit.
        self.cpu_limit: int | None = None
        self.dead = False
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def _send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        payload = orjson.dumps(message)
        self.proc.stdin.write(_HEADER.pack(len(payload)) + payload)
        await self.proc.stdin.drain()

    @property
    def max_reply_bytes(self) -> int:
        return max_reply_bytes(self.max_context_bytes, self.max_output_bytes)

    async def _receive(self) -> dict[str, Any]:
        """One reply frame, checked here where node code cannot reach: a frame over the cap or that
        does not decode is refused before it is read whole (BadReply)."""
        assert self.proc.stdout is not None
        header = await self.proc.stdout.readexactly(_HEADER.size)
        size = _HEADER.unpack(header)[0]
        if size > self.max_reply_bytes:
            raise oversized_reply(size, self.max_reply_bytes)
        return decode_reply(await self.proc.stdout.readexactly(size), self.max_context_bytes)

    async def handshake(self) -> None:
        try:
            ready = await asyncio.wait_for(self._receive(), _START_TIMEOUT)
        except (TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            self.dead = True
            await self.close()
            raise SandboxInfraError(
                f"local sandbox did not start: {exc!r} (exit status {self.proc.returncode})"
            ) from None
        if not ready.get("ready"):
            self.dead = True
            await self.close()
            raise SandboxInfraError(f"local sandbox sent {ready!r} instead of its greeting")

    async def init(self, env: dict[str, str]) -> None:
        async with self._lock:
            try:
                await self._send({"op": "init", "env": env})
                await asyncio.wait_for(self._receive(), _START_TIMEOUT)
            except asyncio.CancelledError:
                self.dead = True  # its runner may still be at work: close() must not wait for it
                raise
            except (TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
                await self.close()
                raise SandboxInfraError(f"local sandbox did not accept its environment: {exc!r}") from None

    async def _call(self, request: dict[str, Any], node_id: str, timeout: float) -> dict[str, Any]:
        if self.dead:
            raise SandboxInfraError(f"the sandbox of this execution is gone (node '{node_id}')")
        size = len(orjson.dumps(request["context"]))
        if size > self.max_context_bytes:
            raise NodeError(
                type="ContextTooLarge",
                message=f"context of {size} bytes exceeds the limit of {self.max_context_bytes} "
                f"before node '{node_id}'",
                reason="limit:context",
            )
        async with self._lock:
            try:
                await self._send(request)
                reply = await asyncio.wait_for(self._receive(), timeout)
            except asyncio.CancelledError:
                # The run was cancelled (revoked, the worker stopping) with node code still running: its
                # sandbox is not used again.
                self.dead = True
                raise
            except TimeoutError:
                await self.close()
                raise NodeError(
                    type="TimeoutError",
                    message=f"node '{node_id}' exceeded its time limit of {timeout:g}s",
                    reason="timeout",
                ) from None
            except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError):
                returncode, oom = await self._reap()
                raise _crash(
                    node_id, returncode, oom_killed=oom > 0, wrapped=self.wrapped, cpu_limited=self._at_cpu_limit()
                ) from None
            except BadReply as exc:
                # The node's own doing (it wrote to the protocol or lifted a cap): a failure of that
                # node, not of the sandbox service, so it is not retried or redelivered. The sandbox
                # is not trusted after it.
                await self.close()
                raise exc.error(node_id) from None
        return reply

    def _at_cpu_limit(self) -> bool:
        """Ended by the kernel at RLIMIT_CPU: SIGKILL (its soft and hard limits are equal) with the runner's
        CPU, as the zygote reported it with its exit, near the limit (_CPU_AT_LIMIT)."""
        cpu = self.proc.cpu_seconds if isinstance(self.proc, ForkedProcess) else None
        return (
            self.cpu_limit is not None
            and cpu is not None
            and self.proc.returncode == -signal.SIGKILL
            and cpu >= self.cpu_limit * _CPU_AT_LIMIT
        )

    async def _distrust(self) -> None:
        self.dead = True
        await self.close()

    async def _reap(self) -> tuple[int | None, int]:
        """The exit status of a sandbox that died, and the OOM kills of its cgroup (read before close,
        which hands the group on)."""
        self.dead = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 5)
        returncode = self.proc.returncode
        oom = self.cgroup.oom_kills() if self.cgroup is not None else 0
        await self.close()
        return returncode, oom

    async def close(self) -> None:
        self.dead = True
        forked = isinstance(self.proc, ForkedProcess)
        if forked:
            # Its runner, through a pidfd; isolated, it is PID 1 of its namespace and the kernel kills the
            # rest. The zygote reaps it, so its CPU is counted however it ends.
            self.proc.kill()
        if not forked or self.proc.returncode is None:
            # The whole process group: whatever node code spawned dies with its sandbox.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.returncode is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
        empty = True
        if self.cgroup is not None:
            # The group escapes nothing: setsid() leaves the process group, never the cgroup (and the
            # PID namespace dies with its first process anyway).
            empty = await self.cgroup.kill_all()
            if empty:
                cgroup, self.cgroup = self.cgroup, None
                await (self.recycle(cgroup) if self.recycle is not None else cgroup.remove_soon())
        else:
            await _group_gone(self.proc.pid)
        if isinstance(self.proc, ForkedProcess):
            self.proc.close_pipes()
        elif self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
        if self.host_folder is not None:
            await _remove_folder(self.host_folder)
        if self.lease is not None and empty:
            # Only now: no process of this uid is left, and its files are gone. A sandbox whose cgroup
            # would not empty keeps its uid (leaked, logged) rather than hand it to another client.
            self.lease.release()
            self.lease = None
        if self.net is not None and empty:
            # Likewise: no process is left inside, so the next sandbox gets the namespace to itself.
            self.net.release()
            self.net = None
        if self.on_closed is not None:
            on_closed, self.on_closed = self.on_closed, None
            on_closed()


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _child_setup(uid: int | None, cgroup: SandboxCgroup | None = None) -> Callable[[], None]:
    """Runs in the sandbox process before exec: join its cgroup, drop to its uid (unless bwrap's
    setpriv does it later), and die with the worker.

    Sandboxes run in their own session (so they can be killed as a group), which also means a
    SIGKILLed worker would leave them running: the parent-death signal closes that gap. It is set
    after setuid because changing credentials clears it.
    """

    def setup() -> None:
        if cgroup is not None:
            cgroup.join()
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

    return setup


def _seccomp_pipe(program: bytes | None) -> int | None:
    """A pipe's read end holding the compiled filter, for bwrap's --seccomp (it reads to the end). A
    program is a few hundred instructions, far below a pipe's capacity: the write never blocks."""
    if program is None:
        return None
    read, write = os.pipe()
    try:
        os.write(write, program)
    finally:
        os.close(write)
    return read


def _host_folder(uid: int | None) -> Path:
    """A work folder on the host, under the base folder: mode 0700, the sandbox's uid's."""
    _WORK_BASE.mkdir(mode=0o711, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="nova-sandbox-", dir=_WORK_BASE))
    if uid is not None:
        os.chown(workdir, uid, uid)
    os.chmod(workdir, 0o700)
    return workdir


def _discard(host_folder: Path | None) -> None:
    if host_folder is not None:
        shutil.rmtree(host_folder, ignore_errors=True)


async def _remove_folder(path: Path) -> None:
    """Remove a work folder: at once when node code left it empty (the common case), else on a thread
    (whatever it wrote may be a large tree, which must not stall the event loop)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return
    except OSError:
        await asyncio.to_thread(shutil.rmtree, path, True)


async def _group_gone(pgid: int, timeout: float = 5.0) -> None:
    """Wait until no process of the group is left (children of node code are not ours to wait for)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            return
        await asyncio.sleep(0.01)
    log.warning("processes of sandbox group %d outlived SIGKILL for %.0fs", pgid, timeout)


def _usable_by_others(path: str) -> bool:
    """Whether an unprivileged uid can execute `path` (every folder on the way traversable)."""
    real = Path(os.path.realpath(path))
    if not real.exists() or not real.stat().st_mode & 0o001:
        return False
    return all(parent.stat().st_mode & 0o001 for parent in real.parents)


def _interpreter(configured: str | None, root: bool) -> tuple[str, bool]:
    """The Python for node code, and whether sandboxes can run under their own uids.

    As root we want separate uids, which needs an interpreter other users can run: the configured
    one or this one if they qualify (a venv under /root does not), else the system's python3.
    """
    preferred = configured or sys.executable
    if not root:
        return preferred, False
    candidates = [preferred] if configured else [preferred, "/usr/local/bin/python3", "/usr/bin/python3"]
    for candidate in candidates:
        if _usable_by_others(candidate):
            return candidate, True
    log.warning("no Python that an unprivileged user can run; sandboxes share the worker's uid")
    return preferred, False


def _crash(
    node_id: str,
    returncode: int | None,
    *,
    oom_killed: bool = False,
    wrapped: bool = False,
    cpu_limited: bool = False,
) -> NodeError:
    if oom_killed:
        return NodeError(
            type="MemoryLimitExceeded",
            message=f"node '{node_id}' exceeded the sandbox's memory limit (all its processes together)",
            reason="limit:memory",
        )
    if cpu_limited:
        # Killed (SIGKILL) with its CPU at the limit: the kernel's doing at RLIMIT_CPU.
        returncode = -signal.SIGXCPU
    if wrapped and returncode is not None and 128 < returncode < 128 + 65:
        # bwrap, the sandbox's first process, exits with 128 + the signal that killed the runner.
        returncode = 128 - returncode
    if returncode is not None and returncode < 0:
        sig = signal.Signals(-returncode)
        if sig == signal.SIGXCPU:
            return NodeError(
                type="CPUTimeLimitExceeded",
                message=f"node '{node_id}' exceeded the CPU time limit",
                reason="limit:cpu",
            )
        what = f"was killed by {sig.name}"
    else:
        what = f"exited with status {returncode}"
    return NodeError(
        type="SandboxCrashed", message=f"the sandbox process {what} while running node '{node_id}'", reason="crashed"
    )


class LocalSandboxProvider:
    def __init__(
        self,
        settings: Settings,
        *,
        memory_limit_mb: int = 512,
        cpu_seconds: int | None = None,
        max_output_bytes: int = 1 << 20,
        max_context_bytes: int = 16 << 20,
        max_processes: int = 64,
        max_open_files: int = 256,
        max_file_bytes: int = 256 << 20,
    ) -> None:
        self._root = os.geteuid() == 0
        self.python, self.separate_uids = _interpreter(settings.sandbox_python, self._root)
        self.network = settings.sandbox_network
        self.writable = [p.strip() for p in settings.sandbox_writable.split(",") if p.strip()]
        self.cpus = settings.sandbox_cpus
        self.insecure = settings.sandbox_insecure
        self.launch = settings.sandbox_launch
        self.pool_size = settings.sandbox_pool_size
        self.max_context_bytes = max_context_bytes
        self.limits = {
            "memory_bytes": memory_limit_mb << 20,
            "cpu_seconds": cpu_seconds or int(settings.execution_timeout) + 1,
            "output_bytes": max_output_bytes,
            "context_bytes": max_context_bytes,
            "processes": max_processes,
            "open_files": max_open_files,
            "file_bytes": max_file_bytes,
        }
        self.bwrap: str | None = None
        self.forkserver: ForkServer | None = None
        why_not: str | None = None
        self.fork_why: str | None = None
        # Compiled once here; the zygote and bwrap load it into each sandbox (consumer/sandbox/seccomp.py).
        plain = self.launch == "plain"
        self.seccomp, seccomp_why = (None, "NOVA_SANDBOX_LAUNCH=plain") if plain else compiled_seccomp()
        if self.launch == "plain":
            # Forked without namespaces, cgroup or own uid: the fork server's cost without isolation.
            self.separate_uids = False
            why_not = "NOVA_SANDBOX_LAUNCH=plain"
            self.forkserver = self._forkserver(isolate=False)
        else:
            if self.launch in ("auto", "fork"):
                self.fork_why = self._probe_fork_server()
                if self.fork_why is None:
                    self.forkserver = self._forkserver(isolate=True)
                elif self.launch == "fork":
                    why_not = self.fork_why
            if self.forkserver is None and self.launch in ("auto", "bwrap"):
                self.bwrap = find_bwrap()
                why_not = probe_bwrap(self.bwrap, self.network, self._root)
                if why_not is not None:
                    self.bwrap = None
        self.launcher = (
            "fork server"
            if self.forkserver is not None and self.launch != "plain"
            else ("bubblewrap" if self.bwrap is not None else "plain process")
        )
        if self.launch == "plain":
            self.cgroups, cgroups_why = None, "NOVA_SANDBOX_LAUNCH=plain"
        else:
            self.cgroups, cgroups_why = CgroupRoot.detect()
        egress_why = "not needed"
        self.egress_networks: EgressNetworks | None = None
        allow = settings.egress_allow_list
        netns_why = "the fork server is not in use"
        if self.network == "egress" and self.launcher == "fork server":
            self.egress_networks, netns_why = EgressNetworks.start(allow)
        if self.egress_networks is not None:
            egress_why = ""
        elif self.network == "egress":
            if not self.separate_uids:
                egress_why = "the filter matches the sandboxes' own uids, which need root"
            else:
                egress_why = install_egress_filter(_UID_BASE, _UID_BASE + _UID_SPAN - 1, allow) or ""
        self.isolation = Isolation(
            root=self._root,
            separate_uids=self.separate_uids,
            namespaces=why_not is None and self.launcher != "plain process",
            namespaces_why=why_not or self.launcher,
            cgroups=cgroups_why if self.cgroups else None,
            cgroups_why=cgroups_why,
            network=self.network,
            egress_filtered=self.network == "egress" and not egress_why,
            egress_why=egress_why,
            egress_netns=self.egress_networks is not None,
            egress_netns_why=netns_why,
            seccomp=self.seccomp is not None and self.launcher != "plain process",
            seccomp_why=seccomp_why if self.launcher != "plain process" else self.launcher,
        )
        self._uids = KeptUids(keep=self.cgroups is not None and self.isolation.namespaces and not self.writable)
        # Without full isolation one worker serves one client only (the first it sees), unless allowed.
        self._client: str | None = None
        self._limits_arg = orjson.dumps(self.limits).decode()
        self._pool: list[LocalSandbox] = []
        self._spare_cgroups: list[SandboxCgroup] = []
        self._refilling: set[asyncio.Task[None]] = set()
        self._closed = False
        self.started = 0

    def _probe_fork_server(self) -> str | None:
        return probe_fork_server(self.python, RUNNER, self.network, _SANDBOX_WORKDIR)

    def _forkserver(self, *, isolate: bool) -> ForkServer:
        # The zygote reads the runner as root before any sandbox exists: the install's own copy, not the
        # shared one in the base folder (which another install's workers may overwrite).
        config: dict[str, Any] = {"isolate": isolate, "network": self.network, "limits": self.limits}
        if isolate and self.seccomp is not None:
            config["seccomp"] = base64.b64encode(self.seccomp).decode()
        return ForkServer(self.python, RUNNER, config)

    def statement(self) -> list[str]:
        """What this worker's local sandboxes guarantee, one line each, for its start-up log."""
        if self.launcher == "fork server":
            how = "started by the fork server (one pre-imported zygote per worker forks each sandbox)"
        elif self.launcher == "bubblewrap":
            how = "started by bubblewrap and a fresh interpreter each" + (
                f" (the fork server cannot run: {self.fork_why})" if self.fork_why else ""
            )
        else:
            how = f"started as plain processes ({self.isolation.namespaces_why})"
        lines = [f"local sandbox: {how}"]
        lines += [
            f"local sandbox: {'holds' if holds else 'MISSING'}: {what}" for holds, what in self.isolation.statements()
        ]
        if self.isolation.complete:
            lines.append("local sandbox: fully isolated; nodes of every client may run on this worker")
        elif self.insecure:
            lines.append(
                "local sandbox: NOVA_SANDBOX_INSECURE=1: nodes of every client run here despite what is missing"
            )
        else:
            lines.append(
                "local sandbox: isolation incomplete, so this worker runs nodes of one client only (the first it "
                "sees); NOVA_SANDBOX_INSECURE=1 lifts that"
            )
        return lines

    async def start(self) -> None:
        for line in self.statement():
            (log.warning if "MISSING" in line or "INSECURE" in line else log.info)("%s", line)
        if self.forkserver is not None and not self.forkserver.alive:
            try:
                await self.forkserver.start()
            except OSError as exc:
                log.warning("sandbox fork server: %s (starting it again on first need)", exc)
        await self._refill()

    async def _spawn(self) -> LocalSandbox:
        try:
            lease = self._uids.take() if self.separate_uids else None
        except OSError as exc:
            raise SandboxInfraError(str(exc)) from None
        uid = lease.uid if lease else None
        # The fork server's sandboxes (isolated) make their own; every other kind gets one on the host.
        try:
            host_folder = None if self.launcher in ("fork server", "bubblewrap") else _host_folder(uid)
        except OSError:
            if lease is not None:
                lease.release()
            raise
        workdir = host_folder or _SANDBOX_WORKDIR
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        command = [] if self.forkserver is not None else [self.python, "-I", str(_sandbox_runner()), self._limits_arg]
        setup_uid = uid
        seccomp_fd: int | None = None
        if self.bwrap is not None:
            seccomp_fd = _seccomp_pipe(self.seccomp)
            command = [
                *bwrap_args(
                    self.bwrap,
                    workdir=str(workdir),
                    shared_dirs=[str(_WORK_BASE)],
                    network=self.network,
                    uid=uid,
                    writable=self.writable,
                    seccomp_fd=seccomp_fd,
                    make_workdir=True,
                    tmpfs_bytes=self.limits["memory_bytes"],
                ),
                *command,
            ]
            setup_uid = None  # setpriv drops to it inside the namespaces
        cgroup: SandboxCgroup | None = None
        net: NetSlot | None = None

        async def undo() -> None:
            """Leave nothing of a sandbox that did not start. As at close, its uid and network slot go
            back only once its cgroup is empty: the zygote may have forked it before the failure."""
            empty = True
            if cgroup is not None:
                empty = await cgroup.kill_all()
                if empty:
                    await cgroup.remove_soon()
            _discard(host_folder)
            if net is not None and empty:
                net.release()
            if lease is not None and empty:
                lease.release()

        if self.cgroups is not None:
            try:
                cgroup = self._cgroup()
            except OSError as exc:
                await undo()
                if seccomp_fd is not None:
                    os.close(seccomp_fd)
                raise SandboxInfraError(f"could not create the sandbox's cgroup: {exc}") from None
        try:
            if self.egress_networks is not None:
                net = await self.egress_networks.lend()
            if self.forkserver is not None:
                proc: asyncio.subprocess.Process | ForkedProcess = await self._fork(workdir, env, uid, cgroup, net)
            else:
                proc = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                    # bwrap's sandbox makes its work folder itself (on its own /tmp) and starts there.
                    cwd=workdir if host_folder is not None else "/",
                    env=env,
                    start_new_session=True,
                    limit=_READ_BUFFER,
                    # preexec_fn, not user=/group=: uvloop's subprocess support accepts only the former.
                    preexec_fn=_child_setup(setup_uid, cgroup),
                    pass_fds=() if seccomp_fd is None else (seccomp_fd,),
                )
        except (OSError, subprocess.SubprocessError) as exc:
            await undo()
            raise SandboxInfraError(f"could not start the local sandbox ({self.python}): {exc}") from None
        except asyncio.CancelledError:
            # The worker is closing (a pool refill cancelled mid-start).
            await undo()
            raise
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)
        sandbox = LocalSandbox(
            proc,
            workdir,
            self.max_context_bytes,
            lease,
            max_output_bytes=self.limits["output_bytes"],
            cgroup=cgroup,
            host_folder=host_folder,
        )
        # bwrap's init exits with 128 + the signal that killed the runner; the fork server reports the
        # runner's own status.
        sandbox.wrapped = self.bwrap is not None
        if self.forkserver is not None:
            sandbox.cpu_limit = int(self.limits["cpu_seconds"])
        sandbox.recycle = self._recycle
        sandbox.net = net
        try:
            await sandbox.handshake()
        except asyncio.CancelledError:
            await sandbox.close()
            raise
        self.started += 1
        return sandbox

    def _cgroup(self) -> SandboxCgroup:
        assert self.cgroups is not None
        if self._spare_cgroups:
            group = self._spare_cgroups.pop()
            group.reuse()
            return group
        return self.cgroups.create(self.limits["memory_bytes"], self.limits["processes"], self.cpus)

    async def _recycle(self, group: SandboxCgroup) -> None:
        """Keep an emptied group (no process of it is left: LocalSandbox.close checked) for the next sandbox."""
        if self._closed or len(self._spare_cgroups) >= _SPARE_CGROUPS:
            await group.remove_soon()
        else:
            self._spare_cgroups.append(group)

    async def _fork(
        self, workdir: Path, env: dict[str, str], uid: int | None, cgroup: SandboxCgroup | None, net: NetSlot | None
    ) -> ForkedProcess:
        """A sandbox from the fork server: it gets its ends of the protocol pipes, its cgroup.procs
        files (opened here: the zygote's view of the cgroup file system is read-only) and the network
        namespace lent to it (a duplicate: the zygote closes what it is sent)."""
        assert self.forkserver is not None
        to_sandbox_r, to_sandbox_w = os.pipe()
        from_sandbox_r, from_sandbox_w = os.pipe()
        fds = [to_sandbox_r, from_sandbox_w]
        try:
            if cgroup is not None:
                fds += [os.open(path, os.O_WRONLY) for path in cgroup.procs_files]
            if net is not None:
                fds.append(os.dup(net.fd))
        except OSError:
            for fd in (*fds, to_sandbox_w, from_sandbox_r):
                os.close(fd)
            raise
        request = {
            "uid": uid,
            "workdir": str(workdir),
            "env": env,
            "writable": self.writable,
            "limits": self.limits,
            "netns": net is not None,
        }
        # The worker's ends are the fork server's from here, closed by it if the start fails.
        return await self.forkserver.fork(request, fds, to_sandbox_w, from_sandbox_r, _READ_BUFFER)

    async def _refill(self) -> None:
        while not self._closed and len(self._pool) < self.pool_size:
            try:
                self._pool.append(await self._spawn())
            except SandboxInfraError as exc:
                log.warning("warm pool refill failed: %s", exc)
                return

    def _refill_later(self) -> None:
        if self.pool_size and not self._refilling and not self._closed:
            task = asyncio.create_task(self._refill())
            self._refilling.add(task)
            task.add_done_callback(self._refilling.discard)

    def check_client(self, client: str) -> None:
        """Refuse a second client on a worker whose sandboxes lack a piece of isolation."""
        if self.isolation.complete or self.insecure:
            return
        if self._client is None:
            self._client = client
        elif client != self._client:
            raise NodeError(
                type="SandboxNotIsolated",
                message=f"this worker already ran nodes of client '{self._client}' and its local sandbox lacks "
                f"isolation ({'; '.join(what for holds, what in self.isolation.statements() if not holds)}), so "
                f"it refuses client '{client}' (NOVA_SANDBOX_INSECURE=1 allows it)",
                reason="executor_unavailable",
            )

    async def open(self, spec: SandboxSpec) -> LocalSandbox:
        self.check_client(spec.client)
        t0 = time.perf_counter()
        sandbox = None
        while self._pool:
            candidate = self._pool.pop()
            if candidate.proc.returncode is None:
                sandbox = candidate
                break
            await candidate.close()
        if sandbox is None:
            sandbox = await self._spawn()
        if self._pool:
            # A warm one is left for the next execution: the pool is topped up once this one closes, not
            # now, when starting a sandbox (a fork, its cgroup, its namespaces) would take CPU from this
            # execution's own nodes. As many sandboxes start either way: one per execution.
            sandbox.on_closed = self._refill_later
        else:
            self._refill_later()
        if spec.secrets:
            await sandbox.init(spec.secrets)
        log.debug("sandbox for execution %s ready in %.1f ms", spec.execution_id, (time.perf_counter() - t0) * 1000)
        return sandbox

    async def aclose(self) -> None:
        self._closed = True
        for task in list(self._refilling):
            task.cancel()
        await asyncio.gather(*self._refilling, return_exceptions=True)
        pool, self._pool = self._pool, []
        await asyncio.gather(*(s.close() for s in pool), return_exceptions=True)
        spares, self._spare_cgroups = self._spare_cgroups, []
        await asyncio.gather(*(group.remove_soon() for group in spares), return_exceptions=True)
        self._uids.close()
        if self.forkserver is not None:
            await self.forkserver.aclose()
        if self.egress_networks is not None:
            await self.egress_networks.aclose()
