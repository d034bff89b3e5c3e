"""The Celery baseline, configured as NOVA's Celery deployment was: Redis broker and result backend,
JSON, late acknowledgement, a 600 s limit. Benchmark-only: the product never imports Celery."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

REDIS = os.environ.get("BENCH_CELERY_REDIS", "redis://127.0.0.1:6379/0")


def celery_app(name: str, **conf: Any) -> Celery:
    """A Celery app set up as NOVA's deployment was, plus `conf` (bench/celery_nova.py's task shape)."""
    app = Celery(name, broker=REDIS, backend=REDIS)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_time_limit=600,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        **conf,
    )
    return app


app = celery_app("bench")


@app.task(name="noop")
def noop(context: dict) -> dict:
    return {"status": "success", "final_context": context, "nodes_executed": 2}
