"""The local sandbox's seccomp filter: system calls node code never needs, refused by the kernel.

A deny-list (everything else allowed: node code runs arbitrary Python, subprocesses and C extensions),
compiled once per worker with libseccomp (the `pyseccomp` binding to the system's libseccomp.so.2) into a
classic BPF program, and loaded into every sandbox before node code runs, with no-new-privs: by the fork
server's runner process (`load`, one prctl per sandbox: the zygote is handed the compiled program, so no
sandbox pays for compiling it), or by bwrap (`--seccomp FD`). The filter is inherited by every process
node code starts and cannot be removed.

What it refuses, and why (each refusal is EPERM unless said otherwise):
- add_key, keyctl, request_key: the kernel's keyrings. The user and persistent keyrings belong to the uid,
  not the process, and outlive every process of it: a key one sandbox leaves is read by the next execution
  leased the same uid (another client's). Nothing node code does needs them.
- unshare and clone with a namespace flag (user, mount, PID, network, IPC, UTS, cgroup, time): a user
  namespace grants every capability inside it, which puts the kernel's mount, network and nftables code in
  reach of an unprivileged process, the usual first step of a local privilege escalation. The other flags
  need a capability the sandbox lacks, except combined with a new user namespace.
- clone3, with ENOSYS: its flags are in memory, where a filter cannot read them; with ENOSYS libc falls
  back to clone, whose flags the filter checks (threads, fork and posix_spawn keep working).
- setns: entering other namespaces (needs capabilities: refused whatever a sandbox might gain).
- mount, umount2, pivot_root, chroot and the new mount API (open_tree, move_mount, fsopen, fsconfig,
  fsmount, fspick, mount_setattr): the sandbox's view of the file system is set up before node code runs
  and must stay as it is; they need CAP_SYS_ADMIN, which a user namespace would have given.
- io_uring_setup, io_uring_enter, io_uring_register: a large, young kernel surface behind many recent
  privilege escalations, whose queued operations seccomp cannot see; Python's I/O does not use it.
- bpf: the eBPF verifier and maps, reachable unprivileged where the host allows it, a recurring source of
  kernel exploits.
- perf_event_open: performance counters, a side channel on other tenants and a long list of kernel bugs.
- userfaultfd: lets a process stall the kernel in the middle of a copy from its memory, how exploits win
  the kernel's races.
- kexec_load, kexec_file_load, init_module, finit_module, delete_module: replace the kernel or load code
  into it (need capabilities: listed so that no gained capability reaches them).
- open_by_handle_at: opens any file of a mount by its handle, past every folder's permissions (a known
  container escape with CAP_DAC_READ_SEARCH).
- ptrace, process_vm_readv, process_vm_writev: reading and writing other processes' memory and registers.
  Within one sandbox everything shares a uid, so node code could take over the runner (which still answers
  the worker) or any process it starts; no node needs a debugger, and ptrace has a long record of kernel
  privilege escalations of its own.
- syslog: the kernel's log (kernel addresses, other sandboxes' out-of-memory kills) where the host does
  not restrict it.
- socket of the Unix family, and socketpair of the Unix family of any type but a stream: a Unix socket
  is reached through the file system, which every sandbox sees (read-only, which does not stop a
  connect), so node code talked to the host's services whatever its network policy (PostgreSQL's socket
  with trust auth, a container runtime's, /dev/log). An unnamed stream pair (asyncio's self-pipe,
  multiprocessing's duplex pipes) is connected to itself for good; a datagram or seqpacket pair could be
  pointed at a path (connect or sendto). Also refused so: multiprocessing's managers and its forkserver
  start method, which listen on a Unix socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os

# Namespace flags of clone and unshare (linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080  # unshare only: in clone's flags this bit is part of the exit signal
NAMESPACE_FLAGS = (
    CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET,
)  # fmt: skip

REFUSED = (
    "add_key", "keyctl", "request_key",
    "setns",
    "mount", "umount2", "pivot_root", "chroot",
    "open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "bpf", "perf_event_open", "userfaultfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "syslog",
    "ptrace", "process_vm_readv", "process_vm_writev",
)  # fmt: skip

# Socket families and types (linux/socket.h, linux/net.h); a type may carry SOCK_NONBLOCK and SOCK_CLOEXEC
# in its high bits, hence the mask. Both are C ints to the kernel, which drops the upper 32 bits of the
# 64-bit argument a filter sees: compared whole (EQ), a family with any of those bits set passed the filter
# and still made a Unix socket. Only the low 32 bits are compared.
INT_MASK = 0xFFFFFFFF
AF_UNIX = 1
SOCK_TYPE_MASK = 0xF
SOCK_DGRAM = 2
SOCK_SEQPACKET = 5

# clone's flags are its first argument, but its second on s390 (the stack comes first there). os.uname, not
# platform: the zygote imports this file, and every module it imports is in each sandbox's copy.
_CLONE_FLAGS_ARG = 1 if os.uname().machine.startswith("s390") else 0


def _compile() -> bytes:
    """The filter as a classic BPF program (struct sock_filter[]), for this machine's architecture."""
    import tempfile  # here: the zygote, which loads the program only, must not import it (and random)

    import pyseccomp as seccomp

    refuse = seccomp.ERRNO(errno.EPERM)
    program = seccomp.SyscallFilter(seccomp.ALLOW)
    # The runner sets no-new-privs itself (and bwrap does); the program is loaded by prctl, not libseccomp.
    program.set_attr(seccomp.Attr.CTL_NNP, 0)
    with contextlib.suppress(OSError):  # libseccomp 2.5+: a binary search over the calls, not a list:
        # half the kernel's work at each load (about 30 µs, not 60), where it works out each call's verdict
        program.set_attr(seccomp.Attr.CTL_OPTIMIZE, 2)
    for name in REFUSED:
        if _known(seccomp, name):
            program.add_rule(refuse, name)
    for flag in (*NAMESPACE_FLAGS, CLONE_NEWTIME):
        program.add_rule(refuse, "unshare", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    for flag in NAMESPACE_FLAGS:
        program.add_rule(refuse, "clone", seccomp.Arg(_CLONE_FLAGS_ARG, seccomp.MASKED_EQ, flag, flag))
    program.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.MASKED_EQ, INT_MASK, AF_UNIX))
    for kind in (SOCK_DGRAM, SOCK_SEQPACKET):
        program.add_rule(
            refuse,
            "socketpair",
            seccomp.Arg(0, seccomp.MASKED_EQ, INT_MASK, AF_UNIX),
            seccomp.Arg(1, seccomp.MASKED_EQ, SOCK_TYPE_MASK, kind),
        )
    if _known(seccomp, "clone3"):
        program.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    with tempfile.TemporaryFile() as out:
        program.export_bpf(out)
        out.seek(0)
        return out.read()


def _known(seccomp: object, name: str) -> bool:
    """Whether libseccomp knows the call on this architecture (an older library may lack the newest)."""
    return seccomp.resolve_syscall(seccomp.Arch.NATIVE, name) != -1  # type: ignore[attr-defined]


@functools.cache
def compiled() -> tuple[bytes | None, str]:
    """The compiled filter, or None and why there is none (the worker states it at start-up)."""
    try:
        with open("/proc/self/status") as status:
            if "Seccomp:" not in status.read():
                return None, "the kernel has no seccomp"
    except OSError:
        pass
    try:
        return _compile(), "libseccomp"
    except ImportError:
        return None, "the pyseccomp package is not installed"
    except (RuntimeError, OSError, ValueError) as exc:  # pyseccomp raises RuntimeError without libseccomp.so.2
        return None, f"libseccomp is missing or failed ({exc})"


# Loading, in the fork server's sandboxes: standard library only (the zygote imports this file by path).
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class Loader:
    """A compiled program made ready once (in the zygote), loaded with one prctl per sandbox."""

    def __init__(self, program: bytes) -> None:
        if not program or len(program) % _SOCK_FILTER_SIZE:
            raise ValueError(f"a seccomp program of {len(program)} bytes")
        # Everything made here, in the zygote, before any fork: a sandbox only makes the call.
        self._prctl = ctypes.CDLL(None, use_errno=True).prctl
        self._buffer = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(len(program) // _SOCK_FILTER_SIZE, ctypes.addressof(self._buffer))
        self._args = (
            ctypes.c_int(_PR_SET_SECCOMP),
            ctypes.c_ulong(_SECCOMP_MODE_FILTER),
            ctypes.byref(self._fprog),
            0,
            0,
        )

    def load(self) -> None:
        """Install the filter on the calling thread (no-new-privs must be set, or the caller privileged);
        the processes it starts inherit it."""
        if self._prctl(*self._args) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"seccomp: {os.strerror(err)}")
