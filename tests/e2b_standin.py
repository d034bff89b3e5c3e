"""A local stand-in for the parts of E2B that the e2b sandbox uses, for tests without internet.

It serves over real HTTP, so the real `e2b` SDK talks to it unchanged, pointed here through the SDK's
own settings (E2B_API_URL, E2B_SANDBOX_URL, E2B_HTTP_VERSION): the control plane (create and kill a
sandbox) and the in-sandbox daemon (file upload, and process start over Connect, implemented with the
SDK's own generated server classes). A "sandbox" is a temp directory; commands really run there, as
local processes. Each step can be told to fail, to test the adapter's error mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass
class StandIn:
    """What the stand-in saw, and which steps it should fail."""

    sandboxes: dict[str, Path] = field(default_factory=dict)
    envs: dict[str, dict[str, str]] = field(default_factory=dict)
    created: list[str] = field(default_factory=list)
    killed: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    # step name ("create", "upload", "run", "kill") -> HTTP status (or Connect code name for "run")
    fail: dict[str, Any] = field(default_factory=dict)
    # Process groups still running, killed when the stand-in stops.
    running: set[int] = field(default_factory=set)


class ProcessService(process_connect.Process):
    def __init__(self, state: StandIn) -> None:
        self.state = state

    def start(self, request: process_pb.StartRequest, ctx: Any) -> AsyncIterator[process_pb.StartResponse]:
        return self._start(request, ctx)

    async def _start(self, request: process_pb.StartRequest, ctx: Any) -> AsyncIterator[process_pb.StartResponse]:
        if "run" in self.state.fail:
            raise ConnectError(Code.UNAVAILABLE, "sandbox daemon unavailable")
        sandbox_id = ctx.request_headers.get("e2b-sandbox-id", "")
        root = self.state.sandboxes.get(sandbox_id)
        if root is None:
            raise ConnectError(Code.NOT_FOUND, f"sandbox {sandbox_id} not found")
        config = request.process
        self.state.commands.append(" ".join([config.cmd, *config.args]))
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(root),
            **self.state.envs.get(sandbox_id, {}),
            **dict(config.envs),
        }
        proc = await asyncio.create_subprocess_exec(
            config.cmd,
            *config.args,
            cwd=str(root),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self.state.running.add(proc.pid)
        try:
            yield process_pb.StartResponse(
                event=process_pb.ProcessEvent(event=Oneof("start", process_pb.ProcessEvent.StartEvent(pid=proc.pid)))
            )
            assert proc.stdout is not None and proc.stderr is not None
            deadline = ctx.timeout_ms() if callable(ctx.timeout_ms) else ctx.timeout_ms
            try:
                out, err = await asyncio.wait_for(
                    asyncio.gather(proc.stdout.read(), proc.stderr.read()), deadline / 1000 if deadline else None
                )
            except TimeoutError:
                # As envd does: the command's timeout ends the stream with DEADLINE_EXCEEDED.
                raise ConnectError(Code.DEADLINE_EXCEEDED, "command timed out") from None
            for kind, data in (("stdout", out), ("stderr", err)):
                if data:
                    yield process_pb.StartResponse(
                        event=process_pb.ProcessEvent(
                            event=Oneof("data", process_pb.ProcessEvent.DataEvent(output=Oneof(kind, data)))
                        )
                    )
            code = await proc.wait()
            yield process_pb.StartResponse(
                event=process_pb.ProcessEvent(
                    event=Oneof(
                        "end",
                        process_pb.ProcessEvent.EndEvent(exit_code=code, exited=True, status=f"exit status {code}"),
                    )
                )
            )
        finally:
            # A client that hangs up (its command timeout) ends the process, as envd does.
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            self.state.running.discard(proc.pid)


def _app(state: StandIn) -> Starlette:
    async def create(request: Request) -> Response:
        if "create" in state.fail:
            return JSONResponse({"code": state.fail["create"], "message": "injected failure"}, state.fail["create"])
        body = await request.json()
        sandbox_id = "sbx" + uuid.uuid4().hex[:12]
        state.sandboxes[sandbox_id] = Path(tempfile.mkdtemp(prefix="e2b-standin-"))
        state.envs[sandbox_id] = dict(body.get("envVars") or {})
        state.created.append(sandbox_id)
        return JSONResponse(
            {
                "templateID": body.get("templateID", "base"),
                "sandboxID": sandbox_id,
                "clientID": "standin",
                "envdVersion": "0.6.7",
                "envdAccessToken": "standin-token",
            },
            201,
        )

    async def kill(request: Request) -> Response:
        sandbox_id = request.path_params["sandbox_id"]
        state.killed.append(sandbox_id)
        if "kill" in state.fail:
            return JSONResponse({"code": 500, "message": "injected failure"}, 500)
        root = state.sandboxes.pop(sandbox_id, None)
        if root is None:
            return JSONResponse({"code": 404, "message": "sandbox not found"}, 404)
        shutil.rmtree(root, ignore_errors=True)
        return Response(status_code=204)

    async def upload(request: Request) -> Response:
        if "upload" in state.fail:
            return JSONResponse({"code": state.fail["upload"], "message": "injected failure"}, state.fail["upload"])
        root = state.sandboxes.get(request.headers.get("e2b-sandbox-id", ""))
        if root is None:
            return JSONResponse({"code": 404, "message": "sandbox not found"}, 404)
        path = request.query_params["path"]
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if request.headers.get("content-type", "").startswith("multipart/"):
            form = await request.form()
            upload = next(iter(form.values()))
            data = await upload.read()  # type: ignore[union-attr]
        else:
            data = await request.body()
        target.write_bytes(data)
        return JSONResponse([{"name": target.name, "type": "file", "path": path}])

    async def health(_: Request) -> Response:
        return Response(status_code=204)

    process_app = process_connect.ProcessASGIApplication(ProcessService(state))
    return Starlette(
        routes=[
            Route("/v2/sandboxes", create, methods=["POST"]),
            Route("/sandboxes/{sandbox_id}", kill, methods=["DELETE"]),
            Route("/files", upload, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Mount(process_app.path, app=process_app),
        ]
    )


class StandInServer:
    """Runs the stand-in on a free port in its own thread and event loop."""

    def __init__(self) -> None:
        self.state = StandIn()
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(_app(self.state), host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sdk_environment(self) -> dict[str, str]:
        """The SDK's own settings that point it here."""
        return {
            "E2B_API_URL": self.url,
            "E2B_SANDBOX_URL": self.url,
            "E2B_HTTP_VERSION": "1.1",
            "E2B_API_KEY": "e2b_standin_key",
        }

    def __enter__(self) -> StandInServer:
        self.thread.start()
        while not self.server.started:
            self.thread.join(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        for pgid in list(self.state.running):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        for root in self.state.sandboxes.values():
            shutil.rmtree(root, ignore_errors=True)
