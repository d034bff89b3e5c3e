"""The production sandbox: node code in an E2B cloud sandbox, through the `e2b` SDK's async API.

One E2B sandbox per execution, created from NOVA_E2B_TEMPLATE with the client's credentials as its
environment, reused for the execution's nodes and killed when the execution ends (also on failure,
timeout and worker shutdown). The node runner (the same runner.py as the local sandbox) is uploaded
once; each node writes its request as a file and runs `python3 runner.py --once request.json`, which
prints the response. A fresh interpreter per node means that, unlike the local sandbox, imports and
globals do not persist between nodes here: the context does.

Error classification (SandboxInfraError is retried by the worker, then dead-lettered):

| where | what | becomes |
| --- | --- | --- |
| create, upload, run | E2B API or daemon unreachable, 5xx, rate limit, timeouts talking to E2B | SandboxInfraError |
| create | authentication refused, unknown template | SandboxInfraError marked permanent in its message |
| run | the command exceeded the node's time limit | NodeError reason "timeout" |
| run | node code raised, broke a limit, left a bad context | NodeError, as in the local sandbox |
| kill | any error | logged; closing never fails an execution |
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from e2b import AsyncSandbox
from e2b.exceptions import (
    AuthenticationException,
    NotFoundException,
    SandboxException,
    TimeoutException,
)

from consumer.sandbox.base import NodeError, SandboxInfraError, SandboxSpec
from consumer.sandbox.runner_client import RunnerSandbox
from shared.settings import Settings

log = logging.getLogger(__name__)

RUNNER = Path(__file__).with_name("runner.py")
# Relative: envd resolves file paths, and runs commands, from the sandbox user's home directory.
REMOTE_DIR = ".nova"
_PERMANENT = (AuthenticationException,)


class E2BSandbox(RunnerSandbox):
    def __init__(self, sandbox: AsyncSandbox, limits: str, registry: set[E2BSandbox]) -> None:
        self.sandbox = sandbox
        self.limits = limits
        self.closed = False
        self._registry = registry
        registry.add(self)

    async def _call(self, request: dict[str, Any], node_id: str, timeout: float) -> dict[str, Any]:
        if self.closed:
            raise SandboxInfraError(f"the E2B sandbox of this execution is closed (node '{node_id}')")
        path = f"{REMOTE_DIR}/request-{uuid.uuid4().hex}.json"
        try:
            await self.sandbox.files.write(path, orjson.dumps(request), use_octet_stream=True)
        except (SandboxException, OSError) as exc:
            raise SandboxInfraError(f"E2B upload failed before node '{node_id}': {exc}") from None
        command = f"python3 {REMOTE_DIR}/runner.py --once {shlex.quote(path)} {shlex.quote(self.limits)}"
        try:
            # Our own bound too: a daemon that ignores the deadline must not hold the worker's slot.
            started = time.monotonic()
            result = await asyncio.wait_for(self.sandbox.commands.run(command, timeout=timeout), timeout + 10)
        except (TimeoutException, TimeoutError) as exc:
            if time.monotonic() - started < timeout * 0.9:
                # The SDK reports an unreachable or paused sandbox as a timeout too; the node's own
                # limit cannot have been reached this early, so it is the infrastructure.
                raise SandboxInfraError(f"E2B could not run node '{node_id}': {exc}") from None
            raise NodeError(
                type="TimeoutError",
                message=f"node '{node_id}' exceeded its time limit of {timeout:g}s",
                reason="timeout",
            ) from None
        except SandboxException as exc:
            # A non-zero exit also raises (CommandExitException); the runner always exits 0 with a
            # response, so anything else is the sandbox failing, not the node.
            raise SandboxInfraError(f"E2B could not run node '{node_id}': {exc}") from None
        except OSError as exc:
            raise SandboxInfraError(f"E2B unreachable while running node '{node_id}': {exc}") from None
        try:
            reply = orjson.loads(result.stdout.strip().splitlines()[-1])
        except (IndexError, orjson.JSONDecodeError):
            raise SandboxInfraError(f"E2B returned no response for node '{node_id}': {result.stderr[-500:]}") from None
        return reply

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._registry.discard(self)
        try:
            await self.sandbox.kill()
        except Exception as exc:
            log.warning("could not kill E2B sandbox %s: %s", self.sandbox.sandbox_id, exc)


class E2BSandboxProvider:
    def __init__(self, settings: Settings, *, memory_limit_mb: int = 1024, max_output_bytes: int = 1 << 20) -> None:
        self.settings = settings
        self.template = settings.e2b_template
        self.api_key = settings.e2b_api_key.get_secret_value() if settings.e2b_api_key else None
        # The sandbox lives at most as long as an execution may (E2B kills it past this).
        self.lifetime = int(settings.execution_timeout) + 60
        self.limits = orjson.dumps({"memory_bytes": memory_limit_mb << 20, "output_bytes": max_output_bytes}).decode()
        self.open_sandboxes: set[E2BSandbox] = set()

    async def start(self) -> None:
        return None

    async def open(self, spec: SandboxSpec) -> E2BSandbox:
        try:
            sandbox = await AsyncSandbox.create(
                template=self.template,
                timeout=self.lifetime,
                envs=spec.secrets or None,
                metadata={"nova_execution_id": str(spec.execution_id), "nova_client": spec.client},
                api_key=self.api_key,
            )
        except _PERMANENT as exc:
            raise SandboxInfraError(f"E2B refused to create a sandbox (permanent: check E2B_API_KEY): {exc}") from None
        except NotFoundException as exc:
            raise SandboxInfraError(f"E2B template '{self.template}' not found (permanent): {exc}") from None
        except (SandboxException, OSError) as exc:
            raise SandboxInfraError(f"E2B could not create a sandbox: {exc}") from None
        wrapped = E2BSandbox(sandbox, self.limits, self.open_sandboxes)
        try:
            await sandbox.files.write(f"{REMOTE_DIR}/runner.py", RUNNER.read_bytes(), use_octet_stream=True)
        except (SandboxException, OSError) as exc:
            await wrapped.close()
            raise SandboxInfraError(f"E2B upload of the node runner failed: {exc}") from None
        return wrapped

    async def aclose(self) -> None:
        # Worker shutdown: nothing may outlive it on E2B's bill.
        for sandbox in list(self.open_sandboxes):
            await sandbox.close()
        self.open_sandboxes.clear()
