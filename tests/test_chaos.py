"""A small chaos run in the suite: workers SIGKILLed, Redis restarted, PostgreSQL stopped; nothing lost."""

from __future__ import annotations

import pytest

from cli.chaos import Chaos


@pytest.mark.timeout(120)
async def test_small_chaos_run_loses_and_duplicates_nothing() -> None:
    report = await Chaos(executions=200, workers=3, kill_every=1.5, postgres_outage=2.0, seed=7).run()
    assert report["accepted"] == 200, report
    assert report["lost"] == 0 and report["duplicated"] == 0, report
    assert report["succeeded"] + report["failed"] + report["dead"] == 200, report
    assert report["failed"] == 20 and report["poison_dead_lettered"] == "2/2", report
    assert report["worker_kills"] >= 3, report
