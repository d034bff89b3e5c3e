"""The local sandbox's fork server: one pre-imported process per worker that forks each sandbox.

Started by the worker as `python -I zygote.py RUNNER_PATH CONFIG_JSON` with its control socket (a Unix
SOCK_SEQPACKET socket) inherited (its number in CONFIG_JSON), as root. It imports the runner once, prepares what every
sandbox shares, and then forks one sandbox per request, so no interpreter and no bwrap starts per
execution. Standard library only, single-threaded (fork of a threaded process is unsafe), and it holds
nothing secret: every sandbox starts as a copy of its memory.

Prepared once, at start (the "view"): a mount namespace of its own, private propagation, the whole
system read-only and nosuid, a minimal /dev (null, zero, full, random, urandom, tty bound from the
host's), and, with network `none`, a pool of network namespaces with loopback up.

Per request (fds: the protocol pipes, the sandbox's cgroup.procs files opened by the worker, and with
`egress` the network namespace it lends):
1. the zygote unshares a PID namespace for its next child only, forks, and returns to its own;
2. the child is the sandbox's runner and PID 1 of that namespace: it joins its cgroup first (everything
   after is counted and limited), enters a network namespace: from the pool (`none`), the one the worker
   lent with the request (`egress`: a veth pair to the host, see netns.py), or, with neither, keeps the
   host's (`egress` where namespaces cannot be prepared: the per-uid routing rules apply), and unshares
   mount, IPC and UTS namespaces (a copy of the read-only view);
3. still root and alone in those namespaces, it mounts a fresh tmpfs on /tmp and /dev/shm, binds back
   NOVA_SANDBOX_WRITABLE folders read-write, makes its work folder on its own /tmp (0700, its uid's),
   mounts /proc of its namespace; then it closes every inherited fd but the protocol, drops to its uid and gids
   (setgroups/setresgid/setresuid: every capability goes), sets no-new-privs and its parent-death
   signal, loads the seccomp filter the worker compiled (seccomp.py), and serves the runner protocol.
When it exits or is killed, the kernel kills the rest of its namespace: nothing node code started
outlives it. The zygote is its parent and reaps it, so its CPU is counted in the zygote's reaped time
however it ended (what the benchmarks and the cost model read).

Why no separate init: an init is one more copy of this interpreter per sandbox, and each page it writes
is a page fault (a third of a sandbox's faults, about 0.9 ms). What PID 1 changes for node code: a
signal sent from inside the sandbox to the runner with no handler is ignored (the worker's kill, the
sandbox's time and CPU limits and the OOM killer are not: they come from outside or from the kernel),
and the exited processes node code orphaned stay zombies (counted in the sandbox's process limit) until
the sandbox ends with its execution.
The worker gets the runner's pid and a pidfd (a kill that cannot hit a reused pid), and an exit message when
the zygote reaps it. The runner dies with the zygote and the zygote with the worker (parent-death signals).

Python 3.11 has no os.unshare/os.setns/mount: they are libc calls through ctypes.
"""

import base64
import ctypes
import errno
import fcntl
import importlib.util
import json
import os
import select
import signal
import socket
import struct
import sys
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

_SYS_MOUNT_SETATTR = 442  # the same number on x86_64 and arm64 (new syscalls share one table)
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2

_MNT_DETACH = 0x2
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38

_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
_HEADER = struct.Struct(">I")
_MAX_FDS = 16
_NETNS_POOL = 2


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    def b(s: str | None) -> bytes | None:
        return None if s is None else s.encode()

    result = _libc.mount(b(source), target.encode(), b(fstype), ctypes.c_ulong(flags), b(data))
    _check(result, f"mount {target}")


def prctl(option: int, value: int) -> None:
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(value), 0, 0, 0), "prctl")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> None:
    """Every capability gone (bounding set, ambient, effective, permitted, inheritable), uid unchanged."""
    for cap in range(64):
        if _libc.prctl(ctypes.c_int(_PR_CAPBSET_DROP), ctypes.c_ulong(cap), 0, 0, 0) < 0:
            break  # EINVAL: past the last capability this kernel knows
    _libc.prctl(ctypes.c_int(_PR_CAP_AMBIENT), ctypes.c_ulong(_PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def _read_only_everywhere() -> None:
    """Every mount of this namespace read-only, nosuid and private, in one call (Linux 5.12+)."""
    attr = _MountAttr(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, MS_PRIVATE, 0)
    result = _libc.syscall(
        ctypes.c_long(_SYS_MOUNT_SETATTR),
        ctypes.c_long(_AT_FDCWD),
        ctypes.c_char_p(b"/"),
        ctypes.c_long(_AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    _check(result, "mount_setattr")


def prepare_view() -> None:
    """The zygote's own mount namespace: what every sandbox starts as a copy of."""
    unshare(CLONE_NEWNS)
    # Nothing mounted here reaches the host, and nothing the host mounts later reaches sandboxes.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # A minimal /dev: the host's may hold disks, kmsg, and whatever a container runtime put there.
    devices = {name: os.open(f"/dev/{name}", os.O_PATH) for name in _DEVICES if os.path.exists(f"/dev/{name}")}
    mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k")
    for name, fd in devices.items():
        os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY, 0o666))
        mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
        os.close(fd)
    # The cgroup file systems (a dozen mounts on v1): nothing in a sandbox needs them, and every mount
    # of this view is copied into each sandbox's namespace and torn down with it.
    if os.path.ismount("/sys/fs/cgroup"):
        _check(_libc.umount2(b"/sys/fs/cgroup", ctypes.c_int(_MNT_DETACH)), "umount /sys/fs/cgroup")
    os.mkdir("/dev/shm")
    os.mkdir("/dev/pts")
    for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"/dev/{link}")
    _read_only_everywhere()


def new_netns(host_netns: int) -> int:
    """A network namespace with only loopback, up; returns its fd (the zygote stays in the host's)."""
    unshare(CLONE_NEWNET)
    try:
        # The calling thread's: the worker makes its egress namespaces on a thread of its own.
        fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            ifreq = struct.pack("16sH22x", b"lo", 0)
            flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), 0x8913, ifreq))[1]  # SIOCGIFFLAGS
            fcntl.ioctl(s.fileno(), 0x8914, struct.pack("16sH22x", b"lo", flags | 0x1))  # SIOCSIFFLAGS, IFF_UP
    finally:
        setns(host_netns, CLONE_NEWNET)
    return fd


def _bind(fd: int, path: str, writable: bool) -> None:
    """Bind a folder (opened before /tmp was covered) at its own path, read-only or read-write."""
    os.makedirs(path, exist_ok=True)  # under a fresh tmpfs the mount point must be made
    mount(f"/proc/self/fd/{fd}", path, None, MS_BIND)
    flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (0 if writable else MS_RDONLY)
    mount(None, path, None, flags)


def _make_workdir(path: str, uid: int | None) -> None:
    """The sandbox's work folder, made by the sandbox on its own /tmp: nothing for the worker to make or
    remove, counted in the sandbox's memory cgroup like the rest of /tmp, gone with its mount namespace.
    Mode 0700, its uid's: its processes alone use it."""
    os.mkdir(path, 0o700)
    if uid is not None:
        os.chown(path, uid, uid)


def _build_view(request: dict, workdir: str, uid: int | None) -> None:
    """In the runner, as root, before it drops its privileges (no other process is in its namespaces): a
    fresh /tmp and /dev/shm, the writable folders, its work folder, /proc of its PID namespace with the
    kernel's knobs read-only."""
    # Opened before /tmp is covered by the fresh tmpfs (they may live under /tmp), and inside this
    # namespace (a bind's source must be a mount of the caller's namespace).
    writable = [(os.open(p, os.O_PATH | os.O_DIRECTORY), p) for p in request.get("writable", [])]
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for fd, path in writable:
        _bind(fd, path, True)
        os.close(fd)
    _make_workdir(workdir, uid)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # As bwrap does: the kernel's knobs in /proc stay read-only, whatever uid node code has.
    for knob in ("sys", "sysrq-trigger", "irq", "bus"):
        if os.path.exists(f"/proc/{knob}"):
            mount(f"/proc/{knob}", f"/proc/{knob}", None, MS_BIND)
            mount(None, f"/proc/{knob}", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _say_failed(proto_out: int, why: str) -> None:
    """Tell the worker (in place of the runner's greeting) why the sandbox could not be set up."""
    payload = json.dumps({"ready": False, "error": why}).encode()
    try:
        os.write(proto_out, _HEADER.pack(len(payload)) + payload)
    except OSError:
        pass


def _seccomp_loader(program: str | None) -> Any:
    """The worker's compiled seccomp filter (base64), made ready to load: seccomp.py, next to this file,
    read by path (a script run with -I imports nothing from its own folder)."""
    if not program:
        return None
    spec = importlib.util.spec_from_file_location("nova_seccomp", os.path.join(os.path.dirname(__file__), "seccomp.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Loader(base64.b64decode(program))


class Zygote:
    def __init__(self, runner_path: str, config: dict) -> None:
        spec = importlib.util.spec_from_file_location("nova_runner", runner_path)
        assert spec is not None and spec.loader is not None
        self.runner = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.runner)
        self.isolate = bool(config.get("isolate", True))
        self.network = config.get("network", "egress")
        self.limits = config.get("limits") or {}
        self.host_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY)
        self.host_netns = os.open("/proc/self/ns/net", os.O_RDONLY)
        self.netns_pool: list[int] = []
        self.env: dict[str, str] | None = None  # the environment last set for sandboxes (spawn)
        self.seccomp = _seccomp_loader(config.get("seccomp"))
        self._warm_up()
        if self.isolate:
            prepare_view()

    def _warm_up(self) -> None:
        """Run a node of each kind here once, so what the runner sets up lazily (encoders, compiled
        code paths, the traceback machinery) is already in memory every sandbox starts as a copy of: the
        sandboxes then touch, and copy, fewer pages (each copy is a page fault, the bulk of their cost)."""
        import gc
        import io

        runner = self.runner.Runner(io.BytesIO(), io.BytesIO(), {})
        runner.send({"ready": True, "pid": 0})
        for op, code in (("action", "context['x'] = [1, 'a', None]"), ("evaluate", "context['x'] is not None"),
                         ("action", "raise ValueError('warm')")):  # fmt: skip
            reply = runner.run_node({"op": op, "node_id": "warm", "code": code, "context": {"y": 1.5}})
            runner.send(reply, reply.pop("context_json", None))
        # Nothing of it is left for node code to find: only what the runner module itself holds.
        del runner
        gc.collect()
        # Out of the collector's sight: a collection in a sandbox would otherwise touch (and copy) them all.
        gc.freeze()

    def refill_netns(self) -> None:
        while self.isolate and self.network == "none" and len(self.netns_pool) < _NETNS_POOL:
            self.netns_pool.append(new_netns(self.host_netns))

    def spawn(self, request: dict, fds: list[int]) -> int:
        """Fork one sandbox; returns its runner's pid (in the zygote's PID namespace)."""
        proto_in, proto_out, *cgroup_fds = fds
        netns = None
        pooled = False
        if self.isolate and request.get("netns"):
            # An `egress` namespace the worker lends (veth and NAT set up once): the last fd, closed by
            # serve() with the others; the worker takes it back once the sandbox is gone.
            netns = cgroup_fds.pop()
        elif self.isolate and self.network == "none":
            self.refill_netns()
            netns, pooled = self.netns_pool.pop(), True
        env = request.get("env") or {}
        if env != self.env:
            # The sandboxes' environment, set here (it is the same for each sandbox of a worker) and
            # inherited: set in each sandbox, os.environ's Python code cost 80 page faults per sandbox.
            os.environ.clear()
            os.environ.update(env)
            self.env = dict(env)
        sys.stdout.flush()
        sys.stderr.flush()
        if self.isolate:
            unshare(CLONE_NEWPID)  # for the next child only: the zygote goes back right after
        try:
            pid = os.fork()
        except BaseException:
            if self.isolate:
                setns(self.host_pidns, CLONE_NEWPID)
            raise
        if pid != 0 and self.isolate:
            setns(self.host_pidns, CLONE_NEWPID)
        if pid == 0:
            try:
                self._sandbox(request, proto_in, proto_out, cgroup_fds, netns)
            except BaseException as exc:  # anything: the child must never return into the zygote's loop
                _say_failed(proto_out, f"{type(exc).__name__}: {exc}")
            os._exit(127)
        if pooled and netns is not None:
            os.close(netns)
        return pid

    def _sandbox(self, request: dict, proto_in: int, proto_out: int, cgroup_fds: list[int], netns: int | None) -> None:
        """In the forked child, the runner (PID 1 of its own namespace when isolated): enter the sandbox's
        cgroup and namespaces, make its view as root, then drop every privilege and serve."""
        # Every signal's disposition is the zygote's, the default (it has no handler and no wakeup fd: see
        # serve): nothing to reset here, where each line of Python writes pages the fork shares, each one
        # then copied (signal.signal's reset cost 80 page faults, 20 through _signal).
        os.setsid()  # its own session and group: the worker can kill it as a group
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the zygote (and so with the worker)
        for fd in cgroup_fds:
            # First: every page and process from here on is counted and limited in the sandbox's cgroup.
            os.write(fd, b"0")
            os.close(fd)
        workdir = request["workdir"]
        uid = request.get("uid")
        try:
            if self.isolate:
                if netns is not None:
                    setns(netns, CLONE_NEWNET)
                    os.close(netns)
                unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)
                _build_view(request, workdir, uid)
            os.chdir(workdir)
        except BaseException as exc:
            _say_failed(proto_out, f"{type(exc).__name__}: {exc}")
            os._exit(127)
        try:
            self._runner(request, proto_in, proto_out, uid)
        except BaseException as exc:  # after its descriptors moved: the protocol is fd 1 now
            _say_failed(1, f"{type(exc).__name__}: {exc}")
        os._exit(127)

    def _runner(self, request: dict, proto_in: int, proto_out: int, uid: int | None) -> None:
        os.dup2(proto_in, 0)
        os.dup2(proto_out, 1)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 2)
        # Nothing of the zygote's reaches node code: not its control socket, not other sandboxes' pipes.
        os.closerange(3, 1 << 20)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        elif self.isolate:
            # No uid of its own (no interpreter other users can run): root without any capability, as
            # bwrap leaves it; the worker states the missing uid and serves one client only.
            drop_capabilities()
        prctl(_PR_SET_NO_NEW_PRIVS, 1)
        if self.seccomp is not None:
            self.seccomp.load()  # before any node code: it and every process it starts keep the filter
        # After the uid change, which clears it: the runner dies with the zygote.
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        self.runner.serve_stdio(request.get("limits") or self.limits)
        os._exit(0)

    def serve(self, control: socket.socket) -> None:
        # A child's exit is seen on its pidfd (readable once it exits), not through SIGCHLD: the zygote runs
        # no Python handler per exit and keeps every signal's default disposition, which each sandbox
        # inherits as it is (no reset in each sandbox).
        poller = select.poll()
        poller.register(control, select.POLLIN)
        children: dict[int, int] = {}  # pidfd -> pid
        control.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())
        self.refill_netns()
        while True:
            requested = False
            for fd, _ in poller.poll():
                if fd in children:
                    self._reap(control, poller, children, fd)
                else:
                    requested = True
            if not requested:
                continue
            data, ancdata, _, _ = control.recvmsg(1 << 20, socket.CMSG_SPACE(_MAX_FDS * 4))
            if not data:
                return  # the worker is gone
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
            request = json.loads(data)
            pid = None
            try:
                pid = self.spawn(request, fds)
                pidfd = os.pidfd_open(pid)
            except OSError as exc:
                if pid is not None:  # forked, but it cannot be watched: it goes at once
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                control.send(json.dumps({"id": request["id"], "error": str(exc)}).encode())
            else:
                children[pidfd] = pid
                poller.register(pidfd, select.POLLIN)
                control.sendmsg(
                    [json.dumps({"id": request["id"], "pid": pid}).encode()],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", pidfd))],
                )
            finally:
                for fd in fds:
                    os.close(fd)
            self.refill_netns()

    def _reap(self, control: socket.socket, poller: select.poll, children: dict[int, int], pidfd: int) -> None:
        """A child whose pidfd turned readable: it has exited; reap it and tell the worker."""
        pid = children.pop(pidfd)
        poller.unregister(pidfd)
        os.close(pidfd)
        _, status, usage = os.wait4(pid, 0)
        # Its CPU, with its exit: a runner the kernel killed at the CPU limit (SIGKILL: its soft and hard
        # limits are equal) is told from any other kill by it.
        control.send(json.dumps({"exit": pid, "status": status, "cpu": usage.ru_utime + usage.ru_stime}).encode())


def probe(zygote: Zygote, workdir: str) -> str | None:
    """Set up one whole sandbox and read its runner's greeting: None if it works, else why not."""
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    try:
        pid = zygote.spawn({"workdir": workdir, "env": {}}, [to_r, from_w])
    except OSError as exc:
        return str(exc)
    os.close(to_r)
    os.close(from_w)
    header = os.read(from_r, 4)
    reply = {}
    if len(header) == 4:
        reply = json.loads(os.read(from_r, _HEADER.unpack(header)[0]) or b"{}")
    os.close(to_w)
    os.close(from_r)
    os.waitpid(pid, 0)
    if not reply.get("ready"):
        return reply.get("error") or "the sandbox exited before its runner greeted"
    return None


def main() -> None:
    runner_path, config = sys.argv[1], json.loads(sys.argv[2])
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # dies with the worker that started it
    if os.getppid() != int(config.get("parent", os.getppid())):
        return  # the worker died before the line above
    if "probe" in config:
        try:
            why = probe(Zygote(runner_path, config), config["probe"])
        except OSError as exc:
            why = str(exc)
        print(json.dumps({"ok": why is None, "why": why}), flush=True)
        return
    control = socket.socket(fileno=int(config["control_fd"]))
    try:
        zygote = Zygote(runner_path, config)
    except OSError as exc:
        control.send(json.dumps({"ready": False, "error": str(exc)}).encode())
        return
    zygote.serve(control)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
