"""The dashboard in a real headless Chromium: start an execution and watch it reach SUCCESS live."""

from __future__ import annotations

import shutil
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from shared.settings import Settings
from tests.support import ROOT, create_workflow, in_process_worker, linear
from tests.test_live_api import Live, live  # noqa: F401 - the live-server fixture

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium installed (apt-get install chromium; .ci/run installs it)"
)


async def test_dashboard_shows_an_execution_reaching_success_live(
    live: Live,  # noqa: F811
    redis: Redis,
    settings: Settings,
    pool: asyncpg.Pool,
) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    wf = await create_workflow(
        redis, settings, pool, linear("import time\ntime.sleep(0.5)\ncontext['checked'] = True"), name="Dashboard demo"
    )
    ARTIFACTS.mkdir(exist_ok=True)
    async with playwright_api.async_playwright() as p, in_process_worker(settings):
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{live.base}/?key=test-admin-key")
        await page.wait_for_selector(f"#wf-select option[value='{wf.id}']", state="attached")
        await page.wait_for_function("document.querySelector('#cards').textContent.includes('queue depth')")
        await page.click("#run-btn")
        # No reload: the row and the detail panel follow the SSE streams to SUCCESS.
        await page.wait_for_selector("#recent td.SUCCESS", timeout=20_000)
        await page.wait_for_selector("#detail-status.SUCCESS", timeout=20_000)
        detail = await page.inner_text("#detail")
        assert "a1" in detail and "checked" in detail
        await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        await browser.close()
    assert errors == []
    assert Path(ARTIFACTS / "dashboard.png").stat().st_size > 10_000
