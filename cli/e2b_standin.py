"""A local stand-in for the parts of E2B that the e2b sandbox uses, for tests and `nova chaos
--scenario e2b-plan` without internet (or an E2B bill).

It serves over real HTTP, so the real `e2b` SDK talks to it unchanged, pointed here through the SDK's
own settings (E2B_API_URL, E2B_SANDBOX_URL): the control plane (create, list and kill sandboxes) and
the in-sandbox daemon (file upload and download, process start and connect over Connect, implemented
with the SDK's own generated server classes). A "sandbox" is a temp directory; commands really run
there, as local processes.

As strict as E2B on every path the adapter takes: the API key is checked (401), an unknown template
is a 404, the plan's concurrent sandboxes and creates per second are limits answered with 429 (and
Retry-After), a sandbox expires at the end of the lifetime it was created with (its processes die
with it), a process outlives a dropped stream and can be connected to again, and exits are real.
Each step can also be told to fail a number of times, to test the adapter's error mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b.envd.process import process_connect, process_pb
from protobuf import Oneof
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from cli.embedded import free_port

API_KEY = "e2b_standin_key"


@dataclass
class Proc:
    """A process of a sandbox: it runs on whether or not anyone is connected to it, as under envd."""

    pid: int
    process: asyncio.subprocess.Process
    listeners: list[asyncio.Queue[process_pb.ProcessEvent | ConnectError | None]] = field(default_factory=list)
    ended: bool = False


@dataclass
class Box:
    root: Path
    template: str
    metadata: dict[str, str]
    envs: dict[str, str]
    end_at: float
    started_at: datetime
    procs: dict[int, Proc] = field(default_factory=dict)
    gone: bool = False


@dataclass
class StandIn:
    """What the stand-in saw, its plan limits, and which steps it should fail."""

    sandboxes: dict[str, Box] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    envs: dict[str, dict[str, str]] = field(default_factory=dict)  # sandbox id -> its create-time envs
    create_bodies: list[dict[str, Any]] = field(default_factory=list)
    idempotency_keys: list[str] = field(default_factory=list)  # of every create asked for
    by_idempotency_key: dict[str, dict[str, str]] = field(default_factory=dict)
    templates: set[str] = field(default_factory=lambda: {"base", "nova-nodes"})
    # template -> a directory put first on its sandboxes' PATH (a template image with other programs)
    template_bin: dict[str, Path] = field(default_factory=dict)
    # Plan limits (E2B Hobby: 20 concurrent, 1 create/s); None = unlimited.
    max_sandboxes: int | None = None
    creates_per_second: float | None = None
    rate_limited: int = 0  # 429s answered
    create_times: list[float] = field(default_factory=list)  # time.monotonic() of each create served
    peak: int = 0  # most sandboxes alive at once
    # step name ("create", "create_reply" (after making the sandbox), "upload", "run", "kill", "drop") ->
    # HTTP status (or anything for "run"/"drop")
    fail: dict[str, Any] = field(default_factory=dict)
    # step name -> how many more times it fails (absent: for ever, while in `fail`)
    fail_times: dict[str, int] = field(default_factory=dict)
    _next_create: float = 0.0

    def failing(self, step: str) -> Any:
        if step not in self.fail:
            return None
        left = self.fail_times.get(step)
        if left is not None:
            if left <= 0:
                return None
            self.fail_times[step] = left - 1
        return self.fail[step]

    def expire(self) -> None:
        now = time.monotonic()
        for sandbox_id, box in list(self.sandboxes.items()):
            if box.end_at <= now:
                self.expired.append(sandbox_id)
                self.remove(sandbox_id)

    def remove(self, sandbox_id: str) -> Box | None:
        box = self.sandboxes.pop(sandbox_id, None)
        if box is not None:
            box.gone = True
            for proc in box.procs.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            shutil.rmtree(box.root, ignore_errors=True)
        return box


def _event(kind: str, value: Any) -> process_pb.ProcessEvent:
    return process_pb.ProcessEvent(event=Oneof(kind, value))


class ProcessService(process_connect.Process):
    def __init__(self, state: StandIn) -> None:
        self.state = state

    def _box(self, ctx: Any) -> Box:
        self.state.expire()
        sandbox_id = ctx.request_headers.get("e2b-sandbox-id", "")
        box = self.state.sandboxes.get(sandbox_id)
        if box is None:
            raise ConnectError(Code.NOT_FOUND, f"sandbox {sandbox_id} not found")
        return box

    def start(self, request: process_pb.StartRequest, ctx: Any) -> AsyncIterator[process_pb.StartResponse]:
        return self._start(request, ctx)

    def connect(self, request: process_pb.ConnectRequest, ctx: Any) -> AsyncIterator[process_pb.ConnectResponse]:
        return self._connect(request, ctx)

    async def _pump(self, box: Box, proc: Proc, timeout: float | None) -> None:
        assert proc.process.stdout is not None and proc.process.stderr is not None

        def send(event: process_pb.ProcessEvent | ConnectError | None) -> None:
            for queue in proc.listeners:
                queue.put_nowait(event)

        async def read(stream: asyncio.StreamReader, kind: str) -> None:
            while chunk := await stream.read(65536):
                send(_event("data", process_pb.ProcessEvent.DataEvent(output=Oneof(kind, chunk))))

        try:
            await asyncio.wait_for(
                asyncio.gather(read(proc.process.stdout, "stdout"), read(proc.process.stderr, "stderr")), timeout
            )
        except TimeoutError:
            # The command's timeout ends the process and its streams with DEADLINE_EXCEEDED, as envd does.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.process.wait()
            proc.ended = True
            box.procs.pop(proc.pid, None)
            send(ConnectError(Code.DEADLINE_EXCEEDED, "command timed out"))
            return
        code = await proc.process.wait()
        proc.ended = True
        box.procs.pop(proc.pid, None)
        if box.gone:
            # Killed or expired with its sandbox: the stream breaks, there is no end event.
            send(ConnectError(Code.UNAVAILABLE, "sandbox not found"))
            return
        if code < 0:
            # Ended by a signal: envd reports it as Go does (os.ProcessState): exit code -1, "signal: killed".
            status = f"signal: {signal.strsignal(-code) or -code}".lower()
            end = process_pb.ProcessEvent.EndEvent(exit_code=-1, exited=False, status=status, error=status)
        else:
            end = process_pb.ProcessEvent.EndEvent(exit_code=code, exited=True, status=f"exit status {code}")
        send(_event("end", end))
        send(None)

    async def _follow(self, proc: Proc, drop: bool) -> AsyncIterator[process_pb.ProcessEvent]:
        queue: asyncio.Queue[process_pb.ProcessEvent | ConnectError | None] = asyncio.Queue()
        proc.listeners.append(queue)
        try:
            yield _event("start", process_pb.ProcessEvent.StartEvent(pid=proc.pid))
            if drop:
                # The connection breaks while the process runs on.
                raise ConnectError(Code.UNAVAILABLE, "stream dropped")
            while (event := await queue.get()) is not None:
                if isinstance(event, ConnectError):
                    raise event
                yield event
        finally:
            proc.listeners.remove(queue)

    async def _start(self, request: process_pb.StartRequest, ctx: Any) -> AsyncIterator[process_pb.StartResponse]:
        if self.state.failing("run") is not None:
            raise ConnectError(Code.UNAVAILABLE, "sandbox daemon unavailable")
        box = self._box(ctx)
        config = request.process
        self.state.commands.append(" ".join([config.cmd, *config.args]))
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(box.root), **box.envs, **dict(config.envs)}
        process = await asyncio.create_subprocess_exec(
            config.cmd,
            *config.args,
            cwd=str(box.root),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        proc = Proc(process.pid, process)
        box.procs[proc.pid] = proc
        deadline = ctx.timeout_ms() if callable(ctx.timeout_ms) else ctx.timeout_ms
        drop = self.state.failing("drop") is not None
        stream = self._follow(proc, drop)
        first = await anext(stream)
        asyncio.get_running_loop().create_task(self._pump(box, proc, deadline / 1000 if deadline else None))
        yield process_pb.StartResponse(event=first)
        async for event in stream:
            yield process_pb.StartResponse(event=event)

    async def _connect(self, request: process_pb.ConnectRequest, ctx: Any) -> AsyncIterator[process_pb.ConnectResponse]:
        box = self._box(ctx)
        pid = request.process.selector.value
        proc = box.procs.get(pid)
        if proc is None or proc.ended:
            raise ConnectError(Code.NOT_FOUND, f"process with pid {pid} not found")
        async for event in self._follow(proc, drop=False):
            yield process_pb.ConnectResponse(event=event)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"code": status, "message": message}, status, headers=headers)


def _app(state: StandIn) -> Starlette:
    def authorised(request: Request) -> bool:
        return request.headers.get("x-api-key") == API_KEY

    async def create(request: Request) -> Response:
        state.expire()
        if not authorised(request):
            return _error(401, "Invalid API key")
        key = request.headers.get("idempotency-key")
        if key:
            state.idempotency_keys.append(key)
            done = state.by_idempotency_key.get(key)
            if done is not None and done["sandboxID"] in state.sandboxes:
                # A re-send of a create that was done: the same sandbox, not a second one.
                return JSONResponse(done, 201)
        status = state.failing("create")
        if status is not None:
            return _error(status, "injected failure")
        body = await request.json()
        template = body.get("templateID", "base")
        if template not in state.templates:
            return _error(404, f"template '{template}' not found")
        if state.max_sandboxes is not None and len(state.sandboxes) >= state.max_sandboxes:
            state.rate_limited += 1
            # E2B's answer past the plan's concurrent sandboxes.
            return _error(429, f"you have reached the maximum number of concurrent sandboxes ({state.max_sandboxes})")
        if state.creates_per_second:
            now = time.monotonic()
            if now < state._next_create:
                state.rate_limited += 1
                wait = state._next_create - now
                return _error(429, "rate limit exceeded", {"Retry-After": str(int(wait + 0.999))})
            state._next_create = max(now, state._next_create) + 1 / state.creates_per_second
        state.create_bodies.append(body)
        sandbox_id = "sbx" + uuid.uuid4().hex[:12]
        state.sandboxes[sandbox_id] = Box(
            root=Path(tempfile.mkdtemp(prefix="e2b-standin-")),
            template=template,
            metadata=dict(body.get("metadata") or {}),
            envs=dict(body.get("envVars") or {}),
            end_at=time.monotonic() + float(body.get("timeout", 300)),
            started_at=datetime.now(UTC),
        )
        state.envs[sandbox_id] = dict(body.get("envVars") or {})
        if template in state.template_bin:
            # Commands run in a login shell, as under envd: the profile is where an image sets PATH.
            profile = state.sandboxes[sandbox_id].root / ".bash_profile"
            profile.write_text(f'export PATH="{state.template_bin[template]}:$PATH"\n')
        state.peak = max(state.peak, len(state.sandboxes))
        state.created.append(sandbox_id)
        state.create_times.append(time.monotonic())
        reply = {
            "templateID": template,
            "sandboxID": sandbox_id,
            "clientID": "standin",
            "envdVersion": "0.6.7",
            "envdAccessToken": "standin-token",
        }
        if key:
            state.by_idempotency_key[key] = reply
        status = state.failing("create_reply")
        if status is not None:
            # Made, but the answer is lost on the way (a gateway's 502/504).
            return _error(status, "injected failure after the create")
        return JSONResponse(reply, 201)

    async def listing(request: Request) -> Response:
        state.expire()
        if not authorised(request):
            return _error(401, "Invalid API key")
        wanted = dict(parse_qsl(request.query_params.get("metadata", "")))
        return JSONResponse(
            [
                {
                    "templateID": box.template,
                    "sandboxID": sandbox_id,
                    "clientID": "standin",
                    "startedAt": box.started_at.isoformat(),
                    "endAt": datetime.now(UTC).isoformat(),
                    "cpuCount": 2,
                    "memoryMB": 512,
                    "diskSizeMB": 1024,
                    "state": "running",
                    "envdVersion": "0.6.7",
                    "metadata": box.metadata,
                }
                for sandbox_id, box in state.sandboxes.items()
                if wanted.items() <= box.metadata.items()
            ]
        )

    async def kill(request: Request) -> Response:
        state.expire()
        if not authorised(request):
            return _error(401, "Invalid API key")
        sandbox_id = request.path_params["sandbox_id"]
        if sandbox_id not in state.killed:
            state.killed.append(sandbox_id)
        status = state.failing("kill")
        if status is not None:
            return _error(status, "injected failure")
        if state.remove(sandbox_id) is None:
            return _error(404, "sandbox not found")
        return Response(status_code=204)

    def _target(request: Request) -> Path | Response:
        state.expire()
        box = state.sandboxes.get(request.headers.get("e2b-sandbox-id", ""))
        if box is None:
            return _error(502, "sandbox not found")
        return box.root / request.query_params["path"].lstrip("/")

    async def files(request: Request) -> Response:
        target = _target(request)
        if isinstance(target, Response):
            return target
        if request.method == "GET":
            if not target.is_file():
                return _error(404, "file not found")
            return Response(target.read_bytes(), media_type="application/octet-stream")
        status = state.failing("upload")
        if status is not None:
            return _error(status, "injected failure")
        target.parent.mkdir(parents=True, exist_ok=True)
        if request.headers.get("content-type", "").startswith("multipart/"):
            form = await request.form()
            upload = next(iter(form.values()))
            data = await upload.read()  # type: ignore[union-attr]
        else:
            data = await request.body()
        target.write_bytes(data)
        return JSONResponse([{"name": target.name, "type": "file", "path": request.query_params["path"]}])

    async def health(_: Request) -> Response:
        return Response(status_code=204)

    process_app = process_connect.ProcessASGIApplication(ProcessService(state))
    return Starlette(
        routes=[
            Route("/v2/sandboxes", create, methods=["POST"]),
            Route("/v2/sandboxes", listing, methods=["GET"]),
            Route("/sandboxes/{sandbox_id}", kill, methods=["DELETE"]),
            Route("/files", files, methods=["GET", "POST"]),
            Route("/health", health, methods=["GET"]),
            Mount(process_app.path, app=process_app),
        ]
    )


async def _expirer(state: StandIn) -> None:
    # E2B ends a sandbox at its lifetime whether or not anyone calls it.
    while True:
        state.expire()
        await asyncio.sleep(0.05)


class StandInServer:
    """Runs the stand-in on a free port in its own thread and event loop."""

    def __init__(self) -> None:
        self.state = StandIn()
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(_app(self.state), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        expirer = asyncio.create_task(_expirer(self.state))
        try:
            await self.server.serve()
        finally:
            expirer.cancel()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> list[str]:
        """Sandboxes still running (after expiring those past their lifetime)."""
        self.state.expire()
        return list(self.state.sandboxes)

    def sdk_environment(self) -> dict[str, str]:
        """The SDK's own settings that point it here."""
        return {"E2B_API_URL": self.url, "E2B_SANDBOX_URL": self.url, "E2B_API_KEY": API_KEY}

    def __enter__(self) -> StandInServer:
        self.thread.start()
        while not self.server.started:
            self.thread.join(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        for sandbox_id in list(self.state.sandboxes):
            self.state.remove(sandbox_id)
