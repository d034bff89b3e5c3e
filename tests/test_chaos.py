"""A small chaos run in the suite.

Workers SIGKILLed, Redis restarted, PostgreSQL stopped, and at small scale the faults `nova chaos` turns
on by default (long nodes, lost replies, non-UTF-8 request entries): nothing may be lost or duplicated.
It runs once and each of its checks is its own test, so a failure names the promise it broke. (A second
run with the first three faults alone took 15 s of the suite and checked nothing this one does not.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from cli.chaos import Chaos


@pytest.fixture(scope="module")
async def faulty_report() -> AsyncIterator[dict[str, Any]]:
    """One run with every fault: 100 executions, 10 with a 3 s node (visibility timeout 2 s), 1% of the
    workers' replies lost, one entry with non-UTF-8 bytes. `timeout` bounds the wait for executions
    that never end, so a failure shows up in the report instead of hanging the suite."""
    yield await Chaos(
        executions=100,
        workers=3,
        kill_every=1.5,
        postgres_outage=2.0,
        seed=11,
        timeout=60.0,
        long_node_seconds=3.0,
        long_every=10,
        drop_probability=0.01,
    ).run()


@pytest.mark.timeout(400)
async def test_faulty_run_injected_every_fault(faulty_report: dict[str, Any]) -> None:
    # Not expected to fail: without this the checks below could pass by never being exercised.
    report = faulty_report
    assert report["accepted"] == 100, report
    assert report["worker_kills"] >= 3, report
    assert report["replies_dropped"] > 0, report
    assert report["long_succeeded"].endswith("/10"), report
    assert report["bad_bytes_dead_lettered"].endswith("/1"), report
    assert report["poison_dead_lettered"].endswith("/1"), report


async def test_faulty_run_loses_and_duplicates_nothing(faulty_report: dict[str, Any]) -> None:
    report = faulty_report
    assert report["lost"] == 0 and report["duplicated"] == 0, report
    assert report["events_written_twice"] == 0, report
    assert report["succeeded"] + report["failed"] + report["dead"] == 100, report
    assert report["poison_dead_lettered"] == "1/1", report


async def test_faulty_run_starts_no_long_node_twice(faulty_report: dict[str, Any]) -> None:
    report = faulty_report
    assert report["node_started_twice"] == 0, report
    assert report["long_succeeded"] == "10/10", report


async def test_faulty_run_dead_letters_the_non_utf8_entry(faulty_report: dict[str, Any]) -> None:
    assert faulty_report["bad_bytes_dead_lettered"] == "1/1", faulty_report
