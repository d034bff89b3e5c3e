"""Cron expressions: the one check of an expression and the one way to find its next tick, shared by
the schedules operators create (POST /schedules) and the built-in ones the settings name
(NOVA_CLEANUP_CRON). A module of its own, importing nothing of the project: shared/settings.py uses it,
and shared/schedules.py cannot be imported from there (it imports the settings, through the streams).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from croniter import CroniterError, croniter


class InvalidSchedule(ValueError):
    pass


def next_tick(cron: str, moment_ms: int) -> int:
    """The cron expression's first tick after `moment_ms` (ms). Raises CroniterError (a ValueError)
    for an expression that validate_cron refuses, e.g. one no date matches."""
    start = datetime.fromtimestamp(moment_ms / 1000, UTC)
    return int(croniter(cron, start).get_next(float) * 1000)


def validate_cron(expression: str) -> str:
    """The expression with its whitespace normalized; raises InvalidSchedule if it is not a cron
    expression (5 fields, or 6 with seconds last) or never fires."""
    expression = " ".join(expression.split())
    if len(expression.split()) not in (5, 6) or not croniter.is_valid(expression):
        raise InvalidSchedule(f"'{expression}' is not a cron expression (5 fields, or 6 with seconds last)")
    try:
        next_tick(expression, int(time.time() * 1000))
    except CroniterError:
        # Valid fields that no date matches (February 31st): a schedule that would never fire.
        raise InvalidSchedule(f"'{expression}' never fires (no date matches it)") from None
    return expression
