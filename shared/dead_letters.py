"""Inspecting and replaying the dead-letter stream (used by the API's /dlq routes and `nova dlq`).

A replay enqueues a new task (fresh attempt count) whose payload names the dead task it replays. It
uses the idempotency key `replay:{entry id}`, so replaying the same dead letter twice (two operators,
a retried request) starts one task, not two; the dead letter is deleted once its replay is queued.

With several shards each has its own dead-letter stream, and a letter's id names its shard:
`s<shard>-<entry id>` (a plain entry id with one shard, as before).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.catalog import WorkflowCatalog
from shared.enqueue import REPLAY_KEY_PREFIX, NewExecution, enqueue_execution
from shared.scripts import EnqueueResult, Scripts
from shared.settings import Settings
from shared.streams import DeadLetterField, Keys, RequestField, entry_id_parts, lane_of, loads, printable


class NotALetterId(ValueError):
    """A letter id that names no letter this install could hold (not an entry id, or a shard it lacks)."""


# A letter's id: `s<shard>-` (several shards only) and a stream entry id.
LETTER_ID_PATTERN = r"(?:s([0-9]{1,5})-)?([0-9]{1,19}-[0-9]{1,19})"
_LETTER_ID = re.compile(LETTER_ID_PATTERN)


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
        # A letter may hold bytes that are not UTF-8 (that is often why it is here).
        fields = {printable(k): printable(v) for k, v in self.fields.items()}
        return {
            "id": self.id,
            "reason": fields.get(DeadLetterField.REASON, ""),
            "error": fields.get(DeadLetterField.ERROR, ""),
            "attempts": int(fields.get(DeadLetterField.ATTEMPTS) or 0),
            "deliveries": int(fields.get(DeadLetterField.DELIVERIES) or 0),
            "original_id": fields.get(DeadLetterField.ORIGINAL_ID, ""),
            "dead_at": fields.get(DeadLetterField.DEAD_AT, ""),
            "task_id": fields.get(RequestField.TASK_ID),
            "client": fields.get(RequestField.CLIENT),
            "fields": fields,
        }


class DeadLetters:
    def __init__(self, redis: Redis, keys: Keys, settings: Settings, catalog: WorkflowCatalog) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.catalog = catalog
        self.scripts = Scripts(redis, keys)

    def _locate(self, letter_id: str) -> tuple[Keys, str, bool]:
        """The shard and stream entry id a letter id names (a plain entry id: the home shard's), and
        whether it named its shard. Raises NotALetterId for anything else: an id Redis would refuse must
        not reach it."""
        found = _LETTER_ID.fullmatch(letter_id)
        if found is None:
            raise NotALetterId(f"{letter_id!r} is not a dead letter id (an entry id, or s<shard>-<entry id>)")
        shard, entry_id = found.groups()
        if shard is None:
            return self.keys, entry_id, False
        if int(shard) >= self.keys.shard_count:
            raise NotALetterId(f"{letter_id!r} names shard {int(shard)}; this install has {self.keys.shard_count}")
        return self.keys.sibling(int(shard)), entry_id, True

    def _letter_id(self, keys: Keys, entry_id: str) -> str:
        return entry_id if keys.shard_count == 1 else f"s{keys.shard_index}-{entry_id}"

    async def list(self, *, count: int = 100, after: str | None = None, client: str | None = None) -> list[DeadLetter]:
        """Oldest first; with several shards, each shard's oldest `count` merged in one order: by entry id,
        then shard (shards number their entries apart, so two may hold the same id). `after` is a letter
        id, as listed: the letters after it in that order. Raises NotALetterId."""
        position: tuple[int, int, int] | None = None
        if after:
            keys, entry_id, named = self._locate(after)
            # A plain entry id with several shards (one kept from before sharding): after it in every shard.
            position = (*entry_id_parts(entry_id), keys.shard_index if named else self.keys.shard_count)
        letters: list[tuple[tuple[int, int, int], DeadLetter]] = []
        for keys in self.keys.all_shards:
            if position is None:
                start = "-"
            else:
                ms, seq, shard = position
                # This shard's letters with the same entry id come after it only if the shard does.
                start = f"{ms}-{seq}" if keys.shard_index > shard else f"({ms}-{seq}"
            entries = await self.redis.xrange(keys.dead_letter, min=start, max="+", count=count)
            letters += [
                ((*entry_id_parts(i), keys.shard_index), DeadLetter(self._letter_id(keys, i), f)) for i, f in entries
            ]
        letters.sort(key=lambda pair: pair[0])
        found = [letter for _, letter in letters[:count]]
        if client is not None:
            found = [d for d in found if d.fields.get(RequestField.CLIENT) == client]
        return found

    async def get(self, letter_id: str) -> DeadLetter | None:
        try:
            keys, entry_id, _ = self._locate(letter_id)
            entries = await self.redis.xrange(keys.dead_letter, min=entry_id, max=entry_id, count=1)
        except (NotALetterId, ResponseError):
            return None  # names no letter (an entry id past 64 bits is one Redis refuses)
        return DeadLetter(self._letter_id(keys, entries[0][0]), entries[0][1]) if entries else None

    async def delete(self, letter_id: str) -> bool:
        try:
            keys, entry_id, _ = self._locate(letter_id)
            return bool(await self.redis.xdel(keys.dead_letter, entry_id))
        except (NotALetterId, ResponseError):
            return False

    async def purge(self) -> int:
        length = 0
        for keys in self.keys.all_shards:
            length += int(await self.redis.xlen(keys.dead_letter))
            await self.redis.delete(keys.dead_letter)
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
        # A retry's re-open token and reason name the task it re-opened: a replay is a new task.
        extra = {k: v for k, v in payload.items() if k not in ("initial_context", "reopen_token", "retry_of")}
        result = await enqueue_execution(
            self.scripts,
            NewExecution(
                workflow_id=workflow.id,
                workflow_name=workflow.name,
                client=client,
                initial_context=payload.get("initial_context", {}),
                extra={**extra, "replay_of": f.get(RequestField.TASK_ID)},
                idempotency_key=f"{REPLAY_KEY_PREFIX}{letter.id}",
                # Its lane as it was queued (a forged or unknown value: normal).
                lane=lane_of(f),
            ),
            floor=self.catalog.highest_execution_id,
        )
        await self.delete(letter.id)
        return result
