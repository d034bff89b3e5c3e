"""Reachability of Redis and PostgreSQL; 503 when either is down (for load balancers and Railway).
NOVA's fields (status "healthy", service, version) come first, for its clients and scripts; then what
the workers report of themselves (their executors' lasting faults)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import Res
from api.schemas import CheckOut, ExecutorProblemOut, HealthOut, WorkersHealthOut
from api.version import SERVICE, VERSION
from shared.inspection import executor_problems, worker_reports

router = APIRouter(tags=["health"])

CHECK_TIMEOUT = 1.0


async def _check(probe: Callable[[], Awaitable[Any]]) -> CheckOut:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(probe(), CHECK_TIMEOUT)
    except Exception as exc:
        return CheckOut(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
    return CheckOut(ok=True, latency_ms=round((time.perf_counter() - started) * 1000, 2))


async def _workers(res: Res) -> WorkersHealthOut | None:
    try:
        reports = await asyncio.wait_for(worker_reports(res.redis, res.keys), CHECK_TIMEOUT)
    except Exception:
        return None
    problems = [ExecutorProblemOut(**p) for p in executor_problems(reports)]
    return WorkersHealthOut(live=len(reports), ok=not problems, problems=problems)


@router.get("/health", response_model=HealthOut, responses={503: {"model": HealthOut}})
async def health(res: Res) -> JSONResponse:
    async def postgres() -> None:
        await res.ensure_pool()
        await res.db().fetchval("SELECT 1")

    redis, pg, workers = await asyncio.gather(_check(res.redis.ping), _check(postgres), _workers(res))
    # A worker's executor fault shows in `workers` but leaves the status (and code) alone: the API
    # serves on, and a load balancer must not take it out of rotation for a worker's E2B key.
    ok = redis.ok and pg.ok
    body = HealthOut(
        status="healthy" if ok else "degraded",
        service=SERVICE,
        version=VERSION,
        redis=redis,
        postgres=pg,
        workers=workers,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
