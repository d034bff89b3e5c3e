"""Stopping asyncio tasks for certain."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import Any


async def cancel_until_done(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and return once every one has ended.

    One cancel may be lost: on Python 3.11, asyncio.wait_for (which redis-py wraps every command in)
    returns normally when a cancel lands just as the awaited call completes, and the task runs on. So
    cancel again until each has ended. Their outcomes are collected, not raised.
    """
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for task in tasks:
        with contextlib.suppress(BaseException):
            task.result()
