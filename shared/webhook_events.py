"""The event types a webhook endpoint may subscribe to.

Apart from shared/webhooks.py (which re-exports it) so that `nova`, which names them in its help,
can list them without importing the registry and what it needs (Redis, Sentry, signing, crypto).
"""

from __future__ import annotations

from enum import StrEnum


class WebhookEvent(StrEnum):
    """The event types an endpoint may subscribe to (the payload's `type`)."""

    EXECUTION_SUCCEEDED = "execution.succeeded"
    EXECUTION_FAILED = "execution.failed"
    EXECUTION_DEAD = "execution.dead_lettered"
    NODE_FAILED = "node.failed"
    # Raised by the API's dead man's switch; operators' endpoints only (api/worker_watch.py).
    WORKERS_UNAVAILABLE = "workers.unavailable"
    # A schedule's tick that could not be enqueued (its workflow is gone).
    SCHEDULE_FAILED = "schedule.failed"
