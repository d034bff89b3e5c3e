"""The production sandbox: node code in an E2B cloud sandbox, through the `e2b` SDK's async API.

One E2B sandbox per execution, created from NOVA_E2B_TEMPLATE with the client's credentials as its
environment, reused for the execution's nodes and killed when the execution ends (also on failure,
timeout and worker shutdown). The node runner (the same runner.py as the local sandbox) is uploaded
once; each node writes its request as a file and runs `exec python3 runner.py --once request.json` with
its response redirected to a file, so that a dropped stream can reattach to the still-running command and
still read its reply instead of running the node a second time. The runner replaces the shell (exec) and
its stdout and stderr go to files, so node code has no way to the command's streams, which would reach
the worker's memory; the worker keeps none of them (a 2000-character tail) and reads files within limits.
A fresh interpreter per node means that, unlike the local sandbox, imports and globals do not persist
between nodes here: the context does.

Error classification (SandboxInfraError is retried by the worker, then dead-lettered; SandboxBusy is
handed back to wait, spending no retry and freeing the worker's slot; NodeError fails the execution
at once):

| where | what | becomes |
| --- | --- | --- |
| create | refused key (401), unknown template (404) | NodeError `executor_unavailable` naming them; no retry |
| open | every slot of NOVA_E2B_MAX_SANDBOXES taken, or the create rate spent, past a short wait | SandboxBusy |
| create | 429 (plan's concurrent sandboxes or create rate); never re-sent by the SDK (retries=0) | SandboxBusy |
| create | 502, 503, 504 | re-sent 3 times with the same idempotency key, then SandboxInfraError |
| create, upload, run | E2B unreachable (connect refused, read timeout), other 5xx | SandboxInfraError |
| upload, run, reply | E2B silent past its budget (_E2B_WAIT, and time for the size) | SandboxInfraError |
| run | stream dropped, or ended without an end event | reattach to the running command, take its result |
| run | the sandbox vanished (expired, killed) | SandboxInfraError |
| run | the stream ended at the node's time limit and the read shows no reply | NodeError reason "timeout" |
| run | non-zero exit, or exit 0 and no reply (node ended its interpreter) | NodeError; a SIGKILL is "limit:memory" |
| run | node code raised, broke a limit, left a bad context | NodeError, as in the local sandbox |
| reply | larger than the local sandbox's reply limit: refused, never read past it | NodeError "limit:output" |
| reply | a context over the cap (16 MiB); not a JSON object (node code's) | NodeError "limit:context"; "output" |
| kill | any error | retried a few times, then at each reaper's pass; closing never fails an execution |
| kill | failed | its slot is held (it may be alive) until it is killed or gone (404), then released |
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shlex
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
from connectrpc.errors import ConnectError
from e2b import AsyncSandbox, SandboxQuery
from e2b.exceptions import (
    AuthenticationException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    ServiceBusyException,
    TimeoutException,
)
from e2b.sandbox.commands.command_handle import CommandExitException

from consumer.sandbox.base import CALL_MARGIN, NodeError, SandboxBusy, SandboxInfraError, SandboxSpec
from consumer.sandbox.runner_client import BadReply, RunnerSandbox, decode_reply, max_reply_bytes, oversized_reply
from shared.connections import create_redis
from shared.scripts import Scripts
from shared.semaphore import Semaphore, SemaphoreTimeout
from shared.settings import Settings
from shared.streams import Keys
from shared.tasks import cancel_until_done

log = logging.getLogger(__name__)

RUNNER = Path(__file__).with_name("runner.py")
# Relative: envd resolves file paths, and runs commands, from the sandbox user's home directory.
REMOTE_DIR = ".nova"
# Errors that say E2B (API or sandbox daemon) could not be reached or could not serve now: transient.
_TRANSIENT = (ServiceBusyException, SandboxException, httpx.HTTPError, ConnectError, OSError)
# E2B's share of base.CALL_MARGIN, the engine's wait past a node's time limit. Every wait on E2B in a node
# call outside the node's own run (the request's upload, the command's start, envd's report of the end,
# the reply's download) comes out of this one budget: the call ends within the node's limit and it, so
# E2B's silence surfaces here as a SandboxInfraError (retried) before the engine's bound, which could only
# call it the node's timeout (a permanent failure). The second left is the worker's own work around the
# call, and the engine's bound firing after ours rather than with it.
_E2B_WAIT = CALL_MARGIN - 1.0
# The slowest link a transfer is given time for, beyond _E2B_WAIT: a request or a reply of n bytes may take
# n / _TRANSFER_RATE seconds more (a context at the 16 MiB cap: 16 s). A flat budget failed every node with
# a big context over a link slower than the budget allowed, as E2B's silence, for ever (retried, then
# dead-lettered). The engine's bound on a call grows by the same (E2BSandbox.call_margin).
_TRANSFER_RATE = 1 << 20
# How long a crashed node's stderr is waited for (best effort: the crash is reported without it).
_STDERR_WAIT = 1.0
# How often an interrupted stream may be reattached before the node is given up as infrastructure.
_REATTACHES = 5
_KILL_ATTEMPTS = 3
# Pauses before re-sending a create that E2B answered 502, 503 or 504 (the SDK's own re-sends are off).
_CREATE_RESENDS = (0.5, 1.0, 2.0)
# runner.py needs Python >= 3.10 (match, `X | Y` types): checked once per sandbox, before any node.
_PYTHON_CHECK = (
    'python3 -c \'import sys; print("ok" if sys.version_info >= (3, 10) else "old", sys.version.split()[0])\''
)
# Exit status of a process killed by SIGKILL (the kernel's OOM killer, or RLIMIT_AS in the runner).
_KILLED = (137, -9)
# What a crashed node's error carries of the runner's stderr, and the most of it ever read into the worker.
_STDERR_TAIL = 2000
_STDERR_READ = 64 << 10


class _Tail:
    """The end of a command's output stream, as it arrives (an SDK on_stdout/on_stderr callback): the
    worker keeps _STDERR_TAIL characters of it, whatever node code pushes through."""

    def __init__(self) -> None:
        self.text = ""

    def __call__(self, chunk: str) -> None:
        self.text = (self.text + chunk[-_STDERR_TAIL:])[-_STDERR_TAIL:]


def _status(exc: BaseException) -> int | None:
    return getattr(exc, "status_code", None)


def _resendable(exc: Exception) -> bool:
    """A 502, 503 or 504 on create: E2B may have made the sandbox or not; a re-send with the same
    idempotency key is safe. (A 429 is not re-sent here: the run is handed back instead.)"""
    if isinstance(exc, RateLimitException):
        return False
    return isinstance(exc, ServiceBusyException) or (isinstance(exc, SandboxException) and _status(exc) in (502, 504))


class E2BSandbox(RunnerSandbox):
    def __init__(self, sandbox: AsyncSandbox, limits: str, provider: E2BSandboxProvider, holder: str) -> None:
        self.sandbox = sandbox
        self.holder = holder
        self.limits = limits
        self.closed = False
        self._provider = provider
        provider.open_sandboxes.add(self)

    @property
    def call_margin(self) -> float:
        """How long past a node's limit the engine waits for a call (see E2BSandboxProvider.call_margin)."""
        return self._provider.call_margin

    async def _call(self, request: dict[str, Any], node_id: str, timeout: float) -> dict[str, Any]:
        if self.closed:
            raise SandboxInfraError(f"the E2B sandbox of this execution is closed (node '{node_id}')")
        name = uuid.uuid4().hex
        path, reply_path = f"{REMOTE_DIR}/request-{name}.json", f"{REMOTE_DIR}/reply-{name}.json"
        stderr_path = f"{REMOTE_DIR}/stderr-{name}.txt"
        payload = orjson.dumps(request)
        if len(payload) > self._provider.max_reply_bytes:
            # Beyond anything the runner takes (its context cap), and beyond the upload time call_margin
            # allows for: given its time, the engine's bound would fire first and call it a timeout.
            raise NodeError(
                type="ContextTooLarge",
                message=f"node '{node_id}' was given a request of {len(payload)} bytes, over the limit of "
                f"{self._provider.max_reply_bytes} (a context of at most {self._provider.max_context_bytes})",
                reason="limit:context",
            )
        upload_wait = _E2B_WAIT + len(payload) / _TRANSFER_RATE
        try:
            await asyncio.wait_for(self.sandbox.files.write(path, payload, use_octet_stream=True), upload_wait)
        except TimeoutError:
            raise SandboxInfraError(f"E2B did not answer within {upload_wait:g}s taking node '{node_id}'") from None
        except _TRANSIENT as exc:
            raise SandboxInfraError(f"E2B upload failed before node '{node_id}': {exc!r}") from None
        # `exec`: the runner replaces the shell, which would otherwise stay its parent holding the command's
        # streams, open to node code through /proc/<ppid>/fd (same user) and kept by the SDK in the worker.
        # Its own stdout (the reply) and stderr (its own failures before node code runs) go to files in the
        # sandbox, read within limits; node code's output reaches the worker capped, inside the reply.
        command = (
            f"exec python3 {REMOTE_DIR}/runner.py --once {shlex.quote(path)} {shlex.quote(self.limits)}"
            f" < /dev/null > {shlex.quote(reply_path)} 2> {shlex.quote(stderr_path)}"
        )
        started = time.monotonic()
        # The run's deadline: the node's limit and E2B's budget (_E2B_WAIT), whatever of it each wait used.
        deadline = started + timeout + _E2B_WAIT
        try:
            # envd ends the command at the node's limit and says so: silence past the budget is E2B's.
            streamed, timed_out = await asyncio.wait_for(
                self._run(command, node_id, timeout, started, stderr_path, deadline), deadline - started
            )
        except TimeoutError:
            raise SandboxInfraError(f"E2B did not answer while running node '{node_id}'") from None
        try:
            # E2B silent for _E2B_WAIT between two chunks is E2B's silence (_download); the whole read is
            # bounded by what the largest reply may take at the slowest link given time for.
            output, more = await asyncio.wait_for(
                self._download(reply_path, self._provider.max_reply_bytes),
                _E2B_WAIT + self._provider.max_reply_bytes / _TRANSFER_RATE,
            )
        except TimeoutError:
            raise SandboxInfraError(f"E2B did not answer returning the reply of node '{node_id}'") from None
        except _TRANSIENT as exc:
            raise SandboxInfraError(f"E2B could not return the reply of node '{node_id}': {exc!r}") from None
        if more:
            raise oversized_reply(len(output), self._provider.max_reply_bytes, at_least=True).error(node_id)
        lines = output.strip().splitlines()
        if not lines and timed_out:
            # The stream said the time limit passed, and envd, which ends the command there, answered the
            # read: the node ran to its limit without a reply. (One that ended in time left its reply.)
            raise NodeError(
                type="TimeoutError",
                message=f"node '{node_id}' exceeded its time limit of {timeout:g}s",
                reason="timeout",
            )
        if not lines:
            # The runner always prints a reply before exiting 0: without one, the node's own code ended
            # its interpreter (os._exit, a signal): the node failed, running it again would do the same.
            raise NodeError(
                type="NodeCrashed",
                message=f"node '{node_id}' ended its interpreter without a result",
                reason="crashed",
                stderr=(streamed + await self._stderr(stderr_path, deadline))[-_STDERR_TAIL:],
            )
        try:
            # Checked here, as the local sandbox checks its replies: node code can write the reply itself.
            return decode_reply(lines[-1], self._provider.max_context_bytes)
        except BadReply as exc:
            raise exc.error(node_id) from None

    async def _download(self, path: str, limit: int) -> tuple[bytes, bool]:
        """Up to `limit` bytes of a file of the sandbox, and whether it holds more: node code decides its
        size, so the download stops there and no more than the limit (and a chunk) enters the worker."""
        data = bytearray()
        async with await asyncio.wait_for(self.sandbox.files.read(path, format="stream"), _E2B_WAIT) as stream:
            chunks = aiter(stream)
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(chunks), _E2B_WAIT)
                except StopAsyncIteration:
                    break
                data += chunk
                if len(data) > limit:
                    return bytes(data[:limit]), True
        return bytes(data), False

    async def _stderr(self, path: str, deadline: float) -> str:
        """The end of the runner's stderr file, for a node that crashed: what the runner said before node
        code ran (node code's own output goes into the reply); best effort, never more than _STDERR_READ."""
        wait = min(_STDERR_WAIT, deadline - time.monotonic())
        try:
            if wait <= 0:
                return ""
            data, _ = await asyncio.wait_for(self._download(path, _STDERR_READ), wait)
        except Exception as exc:
            log.info("could not read the stderr of a crashed node (%s): %r", path, exc)
            return ""
        return data.decode(errors="replace")[-_STDERR_TAIL:]

    async def _run(
        self, command: str, node_id: str, timeout: float, started: float, stderr_path: str, deadline: float
    ) -> tuple[str, bool]:
        """Run the command to its end, reattaching when the stream breaks: the end of its stderr stream, and
        whether the stream ended at the node's time limit (the reply then tells whether the node finished)."""
        # Whatever still reaches the command's streams (the login shell's profile, before the exec) is not
        # kept by the SDK (retain_output=False): only its end, for a failure's message.
        tail = _Tail()
        try:
            handle = await self.sandbox.commands.run(
                command, background=True, timeout=timeout, on_stderr=tail, retain_output=False
            )
        except _TRANSIENT as exc:
            raise SandboxInfraError(f"E2B could not run node '{node_id}': {exc!r}") from None
        pid = handle.pid
        for _ in range(_REATTACHES):
            try:
                await handle.wait()
                return tail.text, False
            except CommandExitException as exc:
                # envd reports a process ended by a signal as exit code -1 and "signal: killed" (Go's).
                killed = exc.exit_code in _KILLED or "killed" in (exc.error or "")
                reason = "limit:memory" if killed else "crashed"
                raise NodeError(
                    type="NodeCrashed",
                    message=f"node '{node_id}' ended its interpreter with exit status {exc.exit_code}"
                    + (" (killed: most likely out of memory)" if killed else ""),
                    reason=reason,
                    stderr=(tail.text + await self._stderr(stderr_path, deadline))[-_STDERR_TAIL:],
                ) from None
            except TimeoutException as exc:
                if time.monotonic() - started >= timeout * 0.9:
                    # envd's deadline, or the SDK's own for the stream (a stalled one ends so too): which
                    # one, the reply's read tells (E2B's silence there is infrastructure).
                    return tail.text, True
                # Too early for the node's own limit: the stream broke, or the sandbox is gone; reattaching
                # tells which.
                log.info("stream of node '%s' broke (%r); reattaching to pid %s", node_id, exc, pid)
            except Exception as exc:
                # A dropped stream (ConnectError, an SDK error, "Command ended without an end event"):
                # the command may still be running; running it again would repeat its effects.
                log.info("stream of node '%s' broke (%r); reattaching to pid %s", node_id, exc, pid)
            remaining = max(timeout - (time.monotonic() - started), 0.1)
            try:
                handle = await self.sandbox.commands.connect(
                    pid, timeout=remaining, on_stderr=tail, retain_output=False
                )
            except NotFoundException:
                # It ended while we were away: its reply is in its file.
                return tail.text, False
            except _TRANSIENT as exc:
                raise SandboxInfraError(f"E2B lost node '{node_id}' and could not reattach: {exc!r}") from None
        raise SandboxInfraError(f"E2B kept dropping the stream of node '{node_id}'")

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self._provider.kill(self)


class E2BSandboxProvider:
    def __init__(
        self, settings: Settings, *, max_output_bytes: int = 1 << 20, max_context_bytes: int = 16 << 20
    ) -> None:
        self.settings = settings
        self.template = settings.e2b_template
        self.api_key = settings.e2b_api_key.get_secret_value() if settings.e2b_api_key else None
        # Below the template's RAM, so that the runner's cap, not the kernel, stops a greedy node.
        memory = settings.e2b_sandbox_memory_mb * 3 // 4
        self.limits = orjson.dumps(
            {"memory_bytes": memory << 20, "output_bytes": max_output_bytes, "context_bytes": max_context_bytes}
        ).decode()
        # The runner's caps, checked again on the worker's side (as the local sandbox does): node code can
        # write its own reply.
        self.max_context_bytes = max_context_bytes
        self.max_reply_bytes = max_reply_bytes(max_context_bytes, max_output_bytes)
        # How long past a node's limit the engine waits for one of its calls (base.CALL_MARGIN's part here):
        # E2B's budget for the upload, the run and the reply, and the time the largest request and reply
        # may take at the slowest link given time for; the call's own bounds all end within it.
        self.call_margin = 3 * _E2B_WAIT + 2 * self.max_reply_bytes / _TRANSFER_RATE + 1.0
        self.open_sandboxes: set[E2BSandbox] = set()
        # Sandbox id -> its slot's holder: closed sandboxes whose kill failed. Each may still be alive, so its
        # slot stays held (the cap bounds live sandboxes) until the reaper's retry kills it or finds it gone.
        self.unkilled: dict[str, str] = {}
        self.worker = settings.new_consumer_name()
        # Set when E2B refused the key or the template: what health and metrics report.
        self.permanent_error: str | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._creating: set[asyncio.Future[AsyncSandbox]] = set()
        # The plan's limits, shared by every worker through Redis (none without Redis: a lone worker).
        self.semaphore: Semaphore | None = None
        self._redis: Any = None

    def lifetime(self, spec: SandboxSpec) -> int:
        """Seconds the sandbox may live: the execution's own deadline and a margin, within the plan's maximum."""
        deadline = spec.timeout if spec.timeout is not None else self.settings.execution_timeout
        return int(min(deadline + self.settings.e2b_lifetime_margin, self.settings.e2b_max_lifetime))

    def metadata(self, spec: SandboxSpec, holder: str) -> dict[str, str]:
        return {
            "nova_installation": self.settings.key_prefix,
            # The semaphore slot it lives under: the reaper kills a sandbox whose slot has expired.
            "nova_holder": holder,
            "nova_worker": self.worker,
            "nova_execution_id": str(spec.execution_id),
            "nova_client": spec.client,
        }

    async def start(self) -> None:
        if self.settings.redis_url and self.semaphore is None:
            self._redis = create_redis(self.settings)
            self.semaphore = Semaphore(
                Scripts(self._redis, Keys.from_settings(self.settings)),
                "e2b-sandboxes",
                limit=self.settings.e2b_max_sandboxes,
                # A holder outlives its last refresh by the reclaim horizon: a crashed worker's slots
                # come back when its runs are reclaimed.
                ttl=self.settings.visibility_timeout,
                rate=self.settings.e2b_creates_per_second,
            )
        if self.api_key:
            await self._reap_once()
            if self.semaphore is not None and self._reaper is None:
                self._reaper = asyncio.create_task(self._reap_every(self.settings.visibility_timeout), name="e2b-reap")

    async def _reap_once(self) -> None:
        try:
            await self.reap()
        except AuthenticationException:
            # Known before any execution needs E2B: reported from the start (health, metrics).
            self._permanent("E2B refused the API key (E2B_API_KEY): check it on the E2B dashboard")
        except Exception as exc:
            log.warning("could not list E2B sandboxes to reap: %r", exc)

    async def _reap_every(self, interval: float) -> None:
        # A worker that dies without its shutdown (SIGKILL, a second SIGTERM) leaves its sandboxes to
        # whoever reaps next: every live worker reaps once per visibility timeout, so they go within
        # two of its death (one for its slots to expire), not at some worker's next start.
        while True:
            await asyncio.sleep(max(interval, 0.5))
            await self._reap_once()

    def problem(self) -> str | None:
        """What health and metrics report: a refused key or unknown template, until a create succeeds."""
        return self.permanent_error

    async def reap(self) -> list[str]:
        """Retry the kills that failed, and kill this installation's sandboxes whose slot has expired
        (their worker died); the ids of those it killed."""
        reaped = await self._retry_kills()
        if self.semaphore is None:
            return reaped
        query = SandboxQuery(metadata={"nova_installation": self.settings.key_prefix})
        pages = AsyncSandbox.list(query=query, api_key=self.api_key)
        found = []
        while pages.has_next:
            found.extend(await pages.next_items())
        live = await self.semaphore.live_holders()
        ours = {s.sandbox.sandbox_id for s in self.open_sandboxes} | set(self.unkilled)
        for info in found:
            if info.sandbox_id in ours or (info.metadata or {}).get("nova_holder") in live:
                continue
            log.warning("reaping E2B sandbox %s left by %s", info.sandbox_id, (info.metadata or {}).get("nova_worker"))
            with contextlib.suppress(Exception):
                await AsyncSandbox.kill(info.sandbox_id, api_key=self.api_key)
                reaped.append(info.sandbox_id)
        return reaped

    def _permanent(self, message: str) -> NodeError:
        self.permanent_error = message
        log.error("%s", message)
        return NodeError(type="E2BConfigurationError", message=message, reason="executor_unavailable")

    async def _create(self, spec: SandboxSpec, holder: str, key: str) -> AsyncSandbox:
        create = asyncio.ensure_future(
            AsyncSandbox.create(
                template=self.template,
                timeout=self.lifetime(spec),
                envs=spec.secrets or None,
                metadata=self.metadata(spec, holder),
                api_key=self.api_key,
                # Our re-sends (_create_classified) carry the same key: they cannot make a second sandbox.
                idempotency_key=key,
                # No re-sends by the SDK: it would re-send a 429 after its Retry-After outside our create
                # pacing, colliding with the next paced create (measured with `nova chaos --scenario
                # e2b-plan`: 455 429s for 200 creates). Re-sends are ours (_create_classified).
                retries=0,
            )
        )
        self._creating.add(create)
        create.add_done_callback(self._creating.discard)
        try:
            return await asyncio.shield(create)
        except asyncio.CancelledError:
            # Cancelled (shutdown, timeout) while E2B creates: kill the sandbox once its id arrives.
            create.add_done_callback(self._kill_orphan)
            raise

    def _kill_orphan(self, create: asyncio.Future[AsyncSandbox]) -> None:
        if create.cancelled() or create.exception() is not None:
            return
        task = asyncio.ensure_future(self._kill_sandbox(create.result()))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _busy(self, message: str) -> SandboxBusy:
        # Jitter: runs handed back together would otherwise all come back at once.
        return SandboxBusy(message, self.settings.e2b_rate_limit_wait * random.uniform(1.0, 1.5))

    async def open(self, spec: SandboxSpec) -> E2BSandbox:
        holder = f"{self.worker}.{spec.execution_id}.{uuid.uuid4().hex[:8]}"
        if self.semaphore is not None:
            try:
                # Paced here, not by E2B's 429s. The rule: wait inline only up to NOVA_E2B_INLINE_WAIT (a
                # create token comes within 1/rate s; a slot often within moments); a longer wait
                # costs the worker slot more than a hand-back (a few Redis writes and a trip through
                # the delayed set) costs the run.
                await self.semaphore.acquire(holder, time.monotonic() + self.settings.e2b_inline_wait)
            except SemaphoreTimeout:
                raise self._busy(
                    f"every E2B sandbox slot is taken (NOVA_E2B_MAX_SANDBOXES={self.settings.e2b_max_sandboxes}) "
                    "or the create rate is spent; waiting"
                ) from None
        try:
            sandbox = await self._create_classified(spec, holder)
        except BaseException:
            await self._release(holder)
            raise
        self.permanent_error = None
        wrapped = E2BSandbox(sandbox, self.limits, self, holder)
        try:
            await sandbox.files.write(f"{REMOTE_DIR}/runner.py", RUNNER.read_bytes(), use_octet_stream=True)
            version = await sandbox.commands.run(_PYTHON_CHECK, timeout=30)
        except _TRANSIENT as exc:
            await wrapped.close()
            raise SandboxInfraError(f"E2B upload (or check) of the node runner failed: {exc!r}") from None
        except BaseException:
            await wrapped.close()
            raise
        if not version.stdout.startswith("ok"):
            await wrapped.close()
            raise self._permanent(
                f"the E2B template '{self.template}' has Python {version.stdout.split()[-1:] or '?'}; "
                "the node runner needs python3 >= 3.10 in it"
            )
        return wrapped

    async def _create_classified(self, spec: SandboxSpec, holder: str) -> AsyncSandbox:
        key = f"nova-{spec.execution_id}-{uuid.uuid4().hex}"
        for pause in (*_CREATE_RESENDS, None):
            try:
                return await self._create(spec, holder, key)
            except Exception as exc:
                if pause is None or not _resendable(exc):
                    error = self._create_error(exc)
                    if error is exc:
                        raise
                    raise error from None
                log.info("E2B answered %r to a create; re-sending it in %.1fs", exc, pause)
                await asyncio.sleep(pause)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _create_error(self, exc: Exception) -> Exception:
        """What a failed create becomes (the table at the top); anything unforeseen stays as it is."""
        if isinstance(exc, AuthenticationException):
            return self._permanent("E2B refused the API key (E2B_API_KEY): check it on the E2B dashboard")
        if isinstance(exc, NotFoundException) or (isinstance(exc, _TRANSIENT) and _status(exc) == 404):
            # A 404 on create comes back as a plain SandboxException: the status tells.
            return self._permanent(f"E2B has no template '{self.template}' (NOVA_E2B_TEMPLATE): {exc}")
        if isinstance(exc, RateLimitException):
            # Over the plan (another installation on the same key, limits set above the plan's, or two
            # paced creates brought closer by the network): hand the run back, spending no retry. e2b
            # 2.63 does not pass Retry-After on; NOVA_E2B_RATE_LIMIT_WAIT stands for it.
            return self._busy(f"E2B answered 429 ({exc}); waiting")
        if isinstance(exc, _TRANSIENT):
            return SandboxInfraError(f"E2B could not create a sandbox: {exc!r}")
        return exc

    async def _release(self, holder: str) -> None:
        if self.semaphore is not None:
            try:
                await self.semaphore.release(holder)
            except Exception as exc:
                # The slot expires with its holder's refreshes anyway.
                log.warning("could not release E2B slot %s: %r", holder, exc)

    async def _kill_sandbox(self, sandbox: AsyncSandbox) -> bool:
        """Kill, retried: True once E2B has no such sandbox any more."""
        for attempt in range(_KILL_ATTEMPTS):
            try:
                await sandbox.kill()
                return True
            except NotFoundException:
                return True
            except Exception as exc:
                if _status(exc) == 404:
                    return True
                log.warning("could not kill E2B sandbox %s (attempt %d): %r", sandbox.sandbox_id, attempt + 1, exc)
                await asyncio.sleep(0.2 * 2**attempt)
        return False

    async def kill(self, wrapped: E2BSandbox) -> None:
        # Dropped from the registry only once its kill is done: one interrupted (cancelled) is retried at
        # shutdown; one that failed is handed to the reaper, which retries it (it held its slot for good).
        if await self._kill_sandbox(wrapped.sandbox):
            self.open_sandboxes.discard(wrapped)
            await self._release(wrapped.holder)
            return
        self.open_sandboxes.discard(wrapped)
        self.unkilled[wrapped.sandbox.sandbox_id] = wrapped.holder
        log.warning(
            "E2B sandbox %s could not be killed: its slot stays held until the reaper kills it or finds it gone",
            wrapped.sandbox.sandbox_id,
        )

    async def _retry_kills(self) -> list[str]:
        """One more kill of each sandbox whose kill failed (the reaper's pace is its retry schedule); the
        slot of one killed or gone (404) is released. The ids of those killed."""
        killed = []
        for sandbox_id, holder in list(self.unkilled.items()):
            try:
                # False: E2B has no such sandbox (expired at its lifetime, killed by hand): gone too.
                if await AsyncSandbox.kill(sandbox_id, api_key=self.api_key):
                    killed.append(sandbox_id)
            except Exception as exc:
                log.warning("could not kill E2B sandbox %s (again): %r", sandbox_id, exc)
                continue
            del self.unkilled[sandbox_id]
            await self._release(holder)
        return killed

    async def aclose(self) -> None:
        # Worker shutdown: nothing may outlive it on E2B's bill.
        if self._reaper is not None:
            # Its Redis reads can lose a single cancel (see cancel_until_done), and it would reap on.
            await cancel_until_done([self._reaper])
        if self._creating:
            # Creates cancelled mid-way: their sandboxes are killed as their ids arrive.
            await asyncio.gather(*self._creating, return_exceptions=True)
            await asyncio.sleep(0)
        for sandbox in list(self.open_sandboxes):
            await self.kill(sandbox)  # each retried _KILL_ATTEMPTS times already
        # One more try for those whose kill failed earlier (the reaper's, which stopped); what is left
        # expires at its E2B lifetime.
        await self._retry_kills()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.semaphore is not None:
            with contextlib.suppress(Exception):
                await self.semaphore.aclose()
        if self._redis is not None:
            await self._redis.aclose()
