"""The worker's side of the fork server (consumer/sandbox/zygote.py): start it, ask it for sandboxes.

One zygote per worker process, started with the worker's sandboxes (or on first need) and started
again on the next request if it died; sandboxes it had forked die with it (their runner's parent-death
signal), which their executions see as a crashed sandbox.

A request carries the sandbox's protocol pipes and its cgroup.procs files (opened here, where the
cgroup file system is writable) as SCM_RIGHTS; the answer carries the sandbox runner's pid and a pidfd.
Requests are answered in order, one at a time (the zygote is single-threaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ZYGOTE = Path(__file__).with_name("zygote.py")
_MAX_MESSAGE = 1 << 16
_START_TIMEOUT = 30.0
_probed: dict[tuple[str, str, str], str | None] = {}


def probe_fork_server(python: str, runner: Path, network: str, workdir: Path) -> str | None:
    """Whether the fork server can build an isolated sandbox here (once per interpreter and network
    policy in a process): it prepares its view and forks one whole sandbox. Returns why not, or None."""
    key = (python, str(runner), network)
    if key not in _probed:
        if os.geteuid() != 0:
            _probed[key] = "not root (namespaces and mounts need it here)"
        else:
            config = json.dumps({"probe": str(workdir), "network": network})
            try:
                done = subprocess.run(
                    [python, "-I", str(ZYGOTE), str(runner), config],
                    capture_output=True,
                    timeout=30,
                    env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
                )
                lines = done.stdout.decode(errors="replace").strip().splitlines()
                answer = json.loads(lines[-1]) if lines else {"why": done.stderr.decode(errors="replace")[-500:]}
                _probed[key] = None if answer.get("ok") else f"the fork server cannot run here: {answer.get('why')}"
            except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
                _probed[key] = f"the fork server cannot run here: {exc}"
    return _probed[key]


class ForkedProcess:
    """A sandbox forked by the zygote, shaped like asyncio's Process where LocalSandbox uses it."""

    def __init__(self, pid: int, pidfd: int, stdin: asyncio.StreamWriter, stdout: asyncio.StreamReader) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.stdin = stdin
        self.stdout = stdout
        self.returncode: int | None = None
        # CPU seconds of the runner (and what it reaped), from the zygote's wait; None if unknown.
        self.cpu_seconds: float | None = None
        self._exited = asyncio.Event()
        self.read_transport: asyncio.BaseTransport | None = None

    def kill(self) -> None:
        """SIGKILL its runner (through the pidfd: never another process that reused the pid); isolated, it
        is PID 1 of its namespace, and the kernel then kills everything else in it."""
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    async def wait(self) -> int | None:
        await self._exited.wait()
        return self.returncode

    def exited(self, returncode: int, cpu_seconds: float | None = None) -> None:
        if self.returncode is None:
            self.returncode, self.cpu_seconds = returncode, cpu_seconds
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self._exited.set()

    def close_pipes(self) -> None:
        with contextlib.suppress(Exception):
            self.stdin.close()
        if self.read_transport is not None:
            self.read_transport.close()


def _libuv_closes_pipes(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the loop's pipe transports close the pipe's number themselves (uvloop: libuv owns it once
    connected). uvloop then also closes the file object it was given, a second close of the same number
    one loop pass later, when another thread (the network slots' thread) or this one may have been given
    it: the file objects handed to such a loop must not own their numbers (uvloop issue 763)."""
    return type(loop).__module__.partition(".")[0] == "uvloop"


class ForkServer:
    def __init__(self, python: str, runner: Path, config: dict[str, Any]) -> None:
        self.python = python
        self.runner = runner
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.pid: int | None = None
        self.started = 0
        self._lock = asyncio.Lock()
        self._pending: asyncio.Future[tuple[dict[str, Any], list[int]]] | None = None
        self._pending_id = 0  # the request it answers (0: the greeting)
        self._children: dict[int, ForkedProcess] = {}
        # Exits reported before their sandbox was handed over (it died at once): kept for it.
        self._early_exits: dict[int, tuple[int, float | None]] = {}
        self._next_id = 0

    @property
    def alive(self) -> bool:
        return self.sock is not None

    async def start(self) -> None:
        """Start the zygote (from the event loop's thread: its parent-death signal follows that thread)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = json.dumps({**self.config, "parent": os.getpid(), "control_fd": theirs.fileno()})

        try:
            # Popen, not asyncio: a rare, quick fork+exec, on this thread (the parent-death signal follows it).
            self.proc = subprocess.Popen(  # noqa: ASYNC220
                [self.python, "-I", str(ZYGOTE), str(self.runner), config],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"},
                # Its own session: a Ctrl-C meant for the worker (which drains) does not kill sandboxes.
                start_new_session=True,
                pass_fds=(theirs.fileno(),),
            )
        finally:
            theirs.close()
        ours.setblocking(False)
        self.sock = ours
        loop = asyncio.get_running_loop()
        self._pending = loop.create_future()
        self._pending_id = 0
        loop.add_reader(ours.fileno(), self._readable)
        try:
            hello, _ = await asyncio.wait_for(self._pending, _START_TIMEOUT)
        except (TimeoutError, ConnectionError) as exc:
            self._gone()
            raise OSError(f"the fork server did not start: {exc!r}") from None
        if not hello.get("ready"):
            self._gone()
            raise OSError(f"the fork server could not prepare its sandboxes: {hello.get('error')}")
        self.pid = int(hello["pid"])
        self.started += 1
        log.info("sandbox fork server started (pid %d)", self.pid)

    def _readable(self) -> None:
        assert self.sock is not None
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(_MAX_MESSAGE, socket.CMSG_SPACE(4))
            except BlockingIOError:
                return
            except OSError:
                data, ancdata = b"", []
            if not data:
                self._gone()
                return
            fds: list[int] = []
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.extend(struct.unpack(f"{len(payload) // 4}i", payload[: len(payload) // 4 * 4]))
            message = json.loads(data)
            if "exit" in message:
                child = self._children.pop(int(message["exit"]), None)
                code = os.waitstatus_to_exitcode(int(message["status"]))
                cpu = message.get("cpu")
                if child is not None:
                    child.exited(code, cpu)
                else:
                    self._early_exits[int(message["exit"])] = (code, cpu)
            elif self._pending is not None and not self._pending.done() and message.get("id", 0) == self._pending_id:
                self._pending.set_result((message, fds))
            else:
                # A sandbox nobody waits for any more (its request was cancelled): it goes at once.
                for fd in fds:
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                    os.close(fd)

    def _gone(self) -> None:
        """The zygote exited (or was told to): its sandboxes died with it (parent-death signal)."""
        if self.sock is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(ConnectionError("the fork server exited"))
        for child in self._children.values():
            child.exited(-signal.SIGKILL)
        self._children.clear()
        if self.proc is not None:
            proc, self.proc = self.proc, None
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            # Reaped on a thread: a zygote stuck in the kernel must not stall the event loop.
            asyncio.get_running_loop().run_in_executor(None, proc.wait)

    async def fork(
        self, request: dict[str, Any], fds: list[int], write_end: int, read_end: int, limit: int
    ) -> ForkedProcess:
        """One sandbox: `fds` go to it (and are closed here once sent); `write_end`/`read_end` are the
        worker's ends of its protocol pipes, this call's from the start: closed here if it fails, and
        only here (a second close of a number since reused would close someone else's file)."""
        loop = asyncio.get_running_loop()
        try:
            async with self._lock:
                try:
                    if not self.alive:
                        if self.started:
                            log.warning("sandbox fork server exited; starting it again")
                        await self.start()
                    assert self.sock is not None
                    self._pending = loop.create_future()
                    self._next_id += 1
                    # A late answer to a request given up on (cancelled) must not answer this one.
                    self._pending_id = self._next_id
                    payload = json.dumps({**request, "id": self._next_id}).encode()
                    self.sock.sendmsg(
                        [payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
                    )
                finally:
                    for fd in fds:
                        os.close(fd)
                try:
                    reply, got = await asyncio.wait_for(self._pending, _START_TIMEOUT)
                except TimeoutError:
                    # A zygote that does not answer is of no more use: the next request starts another.
                    self._gone()
                    raise OSError(f"the fork server did not answer in {_START_TIMEOUT:g}s") from None
            if "error" in reply or not got:
                for fd in got:
                    os.close(fd)
                raise OSError(f"the fork server could not fork a sandbox: {reply.get('error')}")
        except BaseException:
            os.close(write_end)
            os.close(read_end)
            raise
        # From here the ends are file objects, whose close is idempotent, and then transports'.
        owned = not _libuv_closes_pipes(loop)
        read_file = os.fdopen(read_end, "rb", buffering=0, closefd=owned)
        write_file = os.fdopen(write_end, "wb", buffering=0, closefd=owned)
        transports: list[asyncio.BaseTransport] = []
        # Files handed to the loop: under uvloop libuv owns their numbers from then on, and closes them
        # itself if the connect fails (a cancel while it completes included).
        handed: list[object] = []
        try:
            reader = asyncio.StreamReader(limit=limit)
            handed.append(read_file)
            read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), read_file)
            transports.append(read_transport)
            handed.append(write_file)
            write_transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, write_file)
        except BaseException:
            for transport in transports:
                transport.close()
            for file in (read_file, write_file):
                if owned:
                    file.close()
                elif file not in handed:
                    os.close(file.fileno())  # never handed to the loop: the number is still ours
            os.close(got[0])
            raise
        writer = asyncio.StreamWriter(write_transport, protocol, None, loop)
        child = ForkedProcess(int(reply["pid"]), got[0], writer, reader)
        child.read_transport = read_transport
        if child.pid in self._early_exits:
            child.exited(*self._early_exits.pop(child.pid))
        elif self.alive:
            self._children[child.pid] = child
        else:
            child.exited(-signal.SIGKILL)
        return child

    async def aclose(self) -> None:
        if self.alive:
            self._gone()
