"""Inspecting and replaying the dead-letter stream (used by the API's /dlq routes and `nova dlq`).

A replay enqueues a new task (fresh attempt count) whose payload names the dead task it replays. It
uses the idempotency key `replay:{entry id}`, so replaying the same dead letter twice (two operators,
a retried request) starts one task, not two; the dead letter is deleted once its replay is queued.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from shared.catalog import WorkflowCatalog
from shared.scripts import EnqueueResult, Scripts
from shared.settings import Settings
from shared.streams import DeadLetterField, Keys, RequestField, dumps, loads, now_iso


class NotReplayable(ValueError):
    """The dead letter cannot be run again as it is (malformed, or its workflow is gone)."""


@dataclass
class DeadLetter:
    id: str
    fields: dict[str, str]

    @property
    def reason(self) -> str:
        return self.fields.get(DeadLetterField.REASON, "")

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "reason": self.reason,
            "error": self.fields.get(DeadLetterField.ERROR, ""),
            "attempts": int(self.fields.get(DeadLetterField.ATTEMPTS) or 0),
            "deliveries": int(self.fields.get(DeadLetterField.DELIVERIES) or 0),
            "original_id": self.fields.get(DeadLetterField.ORIGINAL_ID, ""),
            "dead_at": self.fields.get(DeadLetterField.DEAD_AT, ""),
            "task_id": self.fields.get(RequestField.TASK_ID),
            "client": self.fields.get(RequestField.CLIENT),
            "fields": self.fields,
        }


class DeadLetters:
    def __init__(self, redis: Redis, keys: Keys, settings: Settings, catalog: WorkflowCatalog) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.catalog = catalog
        self.scripts = Scripts(redis, keys)

    async def list(self, *, count: int = 100, after: str | None = None, client: str | None = None) -> list[DeadLetter]:
        start = f"({after}" if after else "-"
        entries = await self.redis.xrange(self.keys.dead_letter, min=start, max="+", count=count)
        letters = [DeadLetter(i, f) for i, f in entries]
        if client is not None:
            letters = [d for d in letters if d.fields.get(RequestField.CLIENT) == client]
        return letters

    async def get(self, entry_id: str) -> DeadLetter | None:
        entries = await self.redis.xrange(self.keys.dead_letter, min=entry_id, max=entry_id, count=1)
        return DeadLetter(*entries[0]) if entries else None

    async def delete(self, entry_id: str) -> bool:
        return bool(await self.redis.xdel(self.keys.dead_letter, entry_id))

    async def purge(self) -> int:
        length = int(await self.redis.xlen(self.keys.dead_letter))
        await self.redis.delete(self.keys.dead_letter)
        return length

    async def replay(self, letter: DeadLetter) -> EnqueueResult:
        f = letter.fields
        try:
            workflow_id = int(f[RequestField.WORKFLOW_ID])
            client = f[RequestField.CLIENT]
            payload = loads(f[RequestField.PAYLOAD])
        except (KeyError, ValueError) as exc:
            raise NotReplayable(f"dead letter {letter.id} is not a complete request ({exc})") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("initial_context", {}), dict):
            raise NotReplayable(f"dead letter {letter.id} has a payload that is not a request")
        workflow = await self.catalog.get(workflow_id)
        if workflow is None:
            raise NotReplayable(f"workflow {workflow_id} of dead letter {letter.id} does not exist")
        context = payload.get("initial_context", {})
        replay_of = f.get(RequestField.TASK_ID)
        enqueued_at = now_iso()
        result = await self.scripts.enqueue(
            task_id=uuid.uuid4().hex,
            workflow_id=workflow.id,
            workflow_name=workflow.name,
            client=client,
            enqueued_at=enqueued_at,
            payload=dumps({**payload, "initial_context": context, "replay_of": replay_of}),
            queued_data=dumps(
                {
                    "workflow_name": workflow.name,
                    "enqueued_at": enqueued_at,
                    "initial_context": context,
                    "replay_of": replay_of,
                }
            ),
            results_maxlen=self.settings.results_maxlen,
            idempotency_key=f"replay:{letter.id}",
        )
        await self.delete(letter.id)
        return result
