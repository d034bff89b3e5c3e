"""Error reporting to Sentry (with SENTRY_DSN set): unhandled errors of the API and workers, and failed
executions, through the official sentry-sdk and its FastAPI and asyncio integrations.

What is sent is kept free of what runs carry: no local variables of frames (node contexts and
credentials pass through them), no request bodies, cookies or Authorization headers, no query strings
(the SSE routes take `access_token` there). A failed execution is reported from its results-stream event,
which the run has already masked, and without its contexts: the workflow, node, error type and message,
tagged with client, execution id and task id, and grouped by workflow and node.
"""

from __future__ import annotations

import logging
import sys
from types import ModuleType
from typing import Any

from shared.events import Event
from shared.settings import Settings
from shared.streams import EventType

log = logging.getLogger(__name__)

# Our own names for secrets, on top of Sentry's list (authorization, password, token, api_key, ...).
OWN_DENYLIST = ["secret", "secrets_key", "admin_key", "access_token", "initial_context", "context"]


# How runs end, not errors of NOVA: a node's own failure, a sandbox to retry, a run another worker took
# over. They travel as exceptions between tasks, which the asyncio integration would report as they are,
# before the run masks them; a run's outcome is reported from its (masked) event instead.
RUN_OUTCOMES = [
    "NodeError",
    "SandboxInfraError",
    "AlreadyFinished",
    "TakenOver",
    "CheckpointUnreadable",
    "MalformedRequest",
]


def _scrub_request(event: dict[str, Any], _hint: dict[str, Any]) -> dict[str, Any] | None:
    request = event.get("request")
    if isinstance(request, dict):
        for field in ("data", "cookies", "query_string", "env"):
            request.pop(field, None)
        headers = request.get("headers")
        if isinstance(headers, dict):
            request["headers"] = {
                k: v for k, v in headers.items() if k.lower() not in ("authorization", "cookie", "x-api-key")
            }
    return event


def init_reporting(settings: Settings, component: str) -> bool:
    """Start the SDK when SENTRY_DSN is set (inside the running loop, for the asyncio integration).
    Imported only then: the SDK with its FastAPI integration (which loads FastAPI and Starlette) was
    about 27 MB of a worker's memory that never reports."""
    if not settings.sentry_dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.asyncio import AsyncioIntegration
    from sentry_sdk.integrations.fastapi import FastApiIntegration
    from sentry_sdk.integrations.starlette import StarletteIntegration
    from sentry_sdk.scrubber import DEFAULT_DENYLIST, EventScrubber

    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        integrations=[StarletteIntegration(), FastApiIntegration(), AsyncioIntegration()],
        include_local_variables=False,
        max_request_body_size="never",
        event_scrubber=EventScrubber(denylist=[*DEFAULT_DENYLIST, *OWN_DENYLIST], recursive=True),
        before_send=_scrub_request,
        traces_sample_rate=0.0,
        ignore_errors=RUN_OUTCOMES,
        server_name=settings.new_consumer_name() if component == "worker" else None,
    )
    sentry_sdk.set_tag("component", component)
    return True


# The event types report_failed_execution reports: a reader can pass over the others without parsing them.
REPORTED_TYPES = frozenset(t.value for t in (EventType.FAILED, EventType.DEAD))


def active_sentry() -> ModuleType | None:
    """The SDK, if reporting started in this process (SENTRY_DSN set); else None, without importing it.
    A client made without a DSN (`sentry_sdk.init()`, as a test resets it) is active yet sends nothing:
    it does not count, or the webhook fan-out would read every event for no one."""
    sdk = sys.modules.get("sentry_sdk")
    if sdk is None:
        return None
    client = sdk.get_client()
    return sdk if client.is_active() and client.dsn else None


def report_failed_execution(event: Event) -> None:
    """One Sentry event for a failed or dead-lettered execution (no-op without SENTRY_DSN)."""
    sentry_sdk = active_sentry() if event.type.value in REPORTED_TYPES else None
    if sentry_sdk is None:
        return
    error = event.data.get("error") if isinstance(event.data.get("error"), dict) else {}
    node = str(error.get("node_id") or "-")
    kind = str(error.get("type") or event.data.get("reason") or "error")
    message = str(error.get("message") or event.data.get("reason") or "")
    with sentry_sdk.new_scope() as scope:
        scope.set_tag("client", event.client)
        scope.set_tag("execution_id", str(event.execution_id))
        scope.set_tag("task_id", event.task_id)
        scope.set_tag("workflow_id", str(event.workflow_id))
        scope.set_tag("node_id", node)
        scope.set_tag("outcome", event.type.value)
        # One issue per workflow and node, whatever the message says (messages carry ids and values).
        scope.fingerprint = ["nova-execution", str(event.workflow_id), node, event.type.value]
        scope.set_context("execution", {"event_id": event.id, "error_type": kind, "reason": error.get("reason")})
        sentry_sdk.capture_message(
            f"Execution {event.type.value} in workflow {event.workflow_id} at node {node}: {kind}: {message}"[:1000],
            level="error",
        )
