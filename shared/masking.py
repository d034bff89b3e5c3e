"""Hiding a run's secrets in everything it shows.

Node code sees its client's credentials (in the context and the environment). Whatever a run shows
or projects (events on the results stream, hence SSE and PostgreSQL; the task hash GET /tasks reads;
logs) goes through one Masker built from those credentials:

- the injected credential keys are dropped from every context shown (input, output, final), and
- every secret value of MIN_SECRET_LENGTH or more characters is replaced by MASK wherever node code
  put it: copied under another key, nested in lists and dicts, inside a longer string, printed to
  stdout or stderr, in an error message or a traceback. The escaped forms that printing produces
  (JSON, repr, URL quoting) are caught too, since `print(json.dumps(context))` and connection URLs
  are how a secret usually travels.

A secret that node code transforms otherwise (base64, a hash, a slice) cannot be recognised; the
checkpoint, which keeps true values for resume and retry, is encrypted instead (consumer/runs.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "***"
# Shorter values match ordinary text by accident (every "abc" in every output) and protect little.
MIN_SECRET_LENGTH = 4

CONTEXT_FIELDS = frozenset({"input_context", "output_context", "final_context"})
# Event data that is the run's own bookkeeping: no node writes into it, and the projector relies on its
# types (a step masked into text would not fit its column). Every other field is masked, so a field
# added later that carries node output (stdout, errors, a protocol message) is covered by default.
BOOKKEEPING_FIELDS = frozenset(
    {
        "step",
        "node_id",
        "node_type",
        "status",
        "started_at",
        "finished_at",
        "duration_ms",
        "next_node",
        "nodes_executed",
        "workflow_name",
        "enqueued_at",
        "consumer",
        "delivery",
        "attempt",
        "attempts",
        "resumed_from_step",
        "retry_at",
    }
)


def _scalars(value: Any) -> Iterator[str]:
    """The text of each scalar in a credential value (a secret may be a number, a list or a dict)."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, int | float):
        yield str(value)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _scalars(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _scalars(item)


def _forms(secret: str) -> set[str]:
    """The secret as it reads once printed: raw, JSON-escaped (ASCII or not), repr'd, URL-quoted."""
    return {
        secret,
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        repr(secret)[1:-1],
        quote(secret, safe=""),
        quote_plus(secret),
    }


class Masker:
    """Masks one run's secrets; without secrets or hidden keys every method returns its input as is."""

    def __init__(self, secrets: Iterable[Any] = (), hidden_keys: Iterable[str] = (), keep: Iterable[str] = ()) -> None:
        kept = set(keep)
        self._texts = frozenset(
            text for value in secrets for text in _scalars(value) if len(text) >= MIN_SECRET_LENGTH and text not in kept
        )
        forms = {form for text in self._texts for form in _forms(text)}
        self.hidden_keys = frozenset(hidden_keys)
        # Longest first: where one secret contains another, the whole of the longer one is masked.
        ordered = sorted(forms, key=lambda f: (-len(f), f))
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @property
    def active(self) -> bool:
        return self._pattern is not None or bool(self.hidden_keys)

    def text(self, text: str) -> str:
        return self._pattern.sub(MASK, text) if self._pattern is not None else text

    def value(self, value: Any) -> Any:
        """A JSON value with every secret masked, in strings, numbers and dict keys, at any depth."""
        if self._pattern is None:
            return value
        return self._value(value)

    def _value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(k) if isinstance(k, str) else k: self._value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._value(v) for v in value]
        if isinstance(value, int | float) and not isinstance(value, bool):
            # A numeric secret (a PIN) copied as a number: shown as masked text. Only the whole number:
            # one that merely contains the digits (a count, a duration) is no copy of it.
            return MASK if str(value) in self._texts else value
        return value

    def context(self, context: dict[str, Any]) -> dict[str, Any]:
        """A context as shown: without the injected credential keys, and masked."""
        if self.hidden_keys:
            context = {k: v for k, v in context.items() if k not in self.hidden_keys}
        return self.value(context)

    def event_data(self, data: dict[str, Any]) -> dict[str, Any]:
        """An event's data as shown: contexts without credential keys, everything but bookkeeping masked."""
        if not self.active:
            return data
        shown = {}
        for key, value in data.items():
            if key in BOOKKEEPING_FIELDS:
                shown[key] = value
            elif key in CONTEXT_FIELDS and isinstance(value, dict):
                shown[key] = self.context(value)
            else:
                shown[key] = self.value(value)
        return shown
