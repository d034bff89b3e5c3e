"""The dashboard in a real headless Chromium: sign in, the workflow graph (branching and looping), the lit
node following a running execution, the cancel button, and one client's session kept to its own
executions. A screenshot of each view is kept under test-artifacts/ (gitignored)."""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from shared.settings import Settings
from tests.support import ADMIN_KEY, BRANCHING, ROOT, create_workflow, in_process_worker, linear, private_dir
from tests.test_live_api import Live, live  # noqa: F401 - the live-server fixture

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"
# Generous: a loaded 2-core machine runs eight suites at once; nothing here is a timing assertion.
WAIT_MS = 30_000

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium installed (apt-get install chromium; .ci/run installs it)"
)

FETCH_PAGE = "context['n'] = context.get('n', 0) + 1\nprint('page', context['n'])"
LOOPING = {
    "nodes": [
        {"id": "start", "type": "start", "next": "fetch"},
        {"id": "fetch", "type": "action", "code": FETCH_PAGE},
        {"id": "more", "type": "decision", "code": "context['n'] < 3", "on_true": "fetch", "on_false": "end"},
        {"id": "end", "type": "end"},
    ],
    "edges": [{"from": "fetch", "to": "more"}],
}


@pytest.fixture
def flags() -> Iterator[Path]:
    """A folder whose files node code waits for (sandboxes may run under their own uid, and see a fresh /tmp
    but for the folders an operator shares: the workers get it as sandbox_writable)."""
    with private_dir("dashboard") as root:
        root.chmod(0o777)
        yield root


def waiting(flag: Path, then: str = "pass") -> str:
    return f"import os, time\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.05)\n{then}"


class Browser:
    """One Chromium page, with every page error and CSP violation it reports kept for the test to check."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        text = message.text
        if "Content Security Policy" in text or "Refused to" in text:
            self.problems.append(f"CSP: {text}")

    async def sign_in(self, base: str, key: str) -> None:
        await self.page.goto(f"{base}/")
        await self.page.wait_for_selector("#signin:not([hidden])")
        await self.page.fill("#key", key)
        await self.page.click("#signin-btn")
        await self.page.wait_for_selector("#app:not([hidden])")

    async def open_execution(self, execution_id: int) -> None:
        await self.page.click(f"#recent tr[data-execution='{execution_id}']", timeout=WAIT_MS)
        await self.page.wait_for_selector(f"#detail-title:text('#{execution_id}')")
        await self.page.wait_for_selector("#graph canvas", timeout=WAIT_MS)
        await self.page.wait_for_selector("#graph[data-drawn='1']", state="attached", timeout=WAIT_MS)

    async def graph(self, name: str) -> str:
        return str(await self.page.get_attribute("#graph", f"data-{name}"))

    async def wait_graph(self, name: str, value: str) -> None:
        # Selectors, not wait_for_function: that evaluates a string, which the page's CSP (rightly) refuses.
        await self.page.wait_for_selector(f"#graph[data-{name}='{value}']", state="attached", timeout=WAIT_MS)

    async def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"dashboard-{name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000
        return path


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    playwright_api = pytest.importorskip("playwright.async_api")
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1100})
            yield Browser(page)
        finally:
            await browser.close()


async def _execute(http: httpx.AsyncClient, workflow_id: int, **body: Any) -> dict[str, Any]:
    response = await http.post(f"/workflows/{workflow_id}/execute", json=body)
    assert response.status_code == 202, response.text
    return dict(response.json())


async def test_signed_in_the_page_follows_an_execution_to_its_end_with_no_key_kept(
    live: Live,  # noqa: F811
    redis: Redis,
    settings: Settings,
    pool: asyncpg.Pool,
) -> None:
    wf = await create_workflow(
        redis, settings, pool, linear("import time\ntime.sleep(0.2)\ncontext['checked'] = True"), name="Dashboard demo"
    )
    async with chromium() as b, in_process_worker(settings):
        page = b.page
        await b.sign_in(live.base, ADMIN_KEY)
        assert "signed in as operator" in await page.inner_text("#who")
        # The key is nowhere the page's scripts (or anyone reading the browser's storage) could find it.
        assert ADMIN_KEY not in page.url
        assert await page.evaluate("localStorage.length + sessionStorage.length") == 0
        assert "nova_session" not in await page.evaluate("document.cookie")  # HttpOnly
        [cookie] = await page.context.cookies()
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != ADMIN_KEY
        await page.wait_for_selector(f"#wf-select option[value='{wf.id}']", state="attached")
        await page.select_option("#wf-select", str(wf.id))
        await page.click("#run-btn")
        # No reload: the row, the detail and the graph follow the SSE streams to the end.
        await page.wait_for_selector("#recent td[data-status='completed']", timeout=WAIT_MS)
        await b.wait_graph("status", "completed")
        assert await b.graph("path") == "start,a1,end"
        assert await b.graph("running") == ""
        assert re.search(r"a1 \(\d+(\.\d+)? m?s\)", await page.inner_text("#path-text"))
        await page.click("#node-buttons button[data-node='a1']")
        await page.wait_for_selector("#node-info-title:text('a1')")
        await page.wait_for_selector("#node-info pre:has-text('checked')")
        # The chart counted the run.
        await page.wait_for_selector("#chart rect", state="attached", timeout=WAIT_MS)
        assert int(str(await page.get_attribute("#chart", "data-finished"))) >= 1
        # Filters: by status, then back.
        await page.select_option("#f-status", "failed")
        await page.wait_for_selector("#recent td:text('no executions match')")
        await page.select_option("#f-status", "completed")
        await page.wait_for_selector("#recent td[data-status='completed']")
        await b.shot("overview")
        await page.click("#logout-btn")
        await page.wait_for_selector("#signin:not([hidden])")
        assert await page.context.cookies() == []
    assert b.problems == []


async def test_the_graph_renders_for_a_branching_and_a_looping_workflow(
    live: Live,  # noqa: F811
    redis: Redis,
    settings: Settings,
    pool: asyncpg.Pool,
) -> None:
    branching = await create_workflow(redis, settings, pool, BRANCHING, name=f"branching-{uuid.uuid4().hex[:6]}")
    looping = await create_workflow(redis, settings, pool, LOOPING, name=f"looping-{uuid.uuid4().hex[:6]}")
    async with (
        chromium() as b,
        in_process_worker(settings),
        httpx.AsyncClient(base_url=live.base, headers=live.admin, timeout=30) as http,
    ):
        page = b.page
        await b.sign_in(live.base, ADMIN_KEY)
        branched = await _execute(http, branching.id, initial_context={"items": [60, 70]})
        looped = await _execute(http, looping.id)
        await page.wait_for_selector(f"#recent tr[data-execution='{looped['execution_id']}']", timeout=WAIT_MS)

        await b.open_execution(branched["execution_id"])
        await b.wait_graph("status", "completed")
        assert await b.graph("nodes") == "6" and await b.graph("edges") == "6"
        assert await b.graph("path") == "start,total,big,approve,end"
        # A click on the drawn decision node shows what it saw and decided.
        at = await page.evaluate("window.novaDashboard.nodePosition('big')")
        await page.mouse.click(at["x"], at["y"])
        await page.wait_for_selector("#node-info-title:text('big')")
        info = await page.inner_text("#node-info")
        assert "input" in info and "130" in info and "next approve" in info
        await b.shot("branching")

        await b.open_execution(looped["execution_id"])
        await b.wait_graph("status", "completed")
        assert await b.graph("nodes") == "4" and await b.graph("edges") == "4"
        assert await b.graph("path") == "start,fetch,more,fetch,more,fetch,more,end"
        await page.click("#node-buttons button[data-node='fetch']")
        await page.wait_for_selector("#node-info-title:text('fetch')")
        info = await page.inner_text("#node-info")
        assert info.count("stdout") == 3 and "page 3" in info
        await b.shot("looping")
    assert b.problems == []


async def test_the_lit_node_follows_a_running_execution(
    live: Live,  # noqa: F811
    redis: Redis,
    settings: Settings,
    pool: asyncpg.Pool,
    flags: Path,
) -> None:
    wf = await create_workflow(
        redis, settings, pool, linear(waiting(flags / "one"), waiting(flags / "two", "context['done'] = True"))
    )
    async with (
        chromium() as b,
        in_process_worker(settings, sandbox_writable=str(flags)),
        httpx.AsyncClient(base_url=live.base, headers=live.admin, timeout=30) as http,
    ):
        page = b.page
        await b.sign_in(live.base, ADMIN_KEY)
        run = await _execute(http, wf.id)
        await b.open_execution(run["execution_id"])
        await b.wait_graph("running", "a1")
        assert await page.get_attribute("#node-buttons button[data-node='a1']", "class") == "node running"
        await b.shot("running-a1")
        (flags / "one").write_text("")
        await b.wait_graph("running", "a2")
        assert "a1 (" in await page.inner_text("#path-text")  # a1's duration, once it finished
        await b.shot("running-a2")
        (flags / "two").write_text("")
        await b.wait_graph("status", "completed")
        assert await b.graph("running") == "" and await b.graph("path") == "start,a1,a2,end"
        assert await page.is_hidden("#cancel-btn")
    assert b.problems == []


async def test_the_cancel_button_cancels_a_running_and_a_queued_execution(
    live: Live,  # noqa: F811
    redis: Redis,
    settings: Settings,
    pool: asyncpg.Pool,
    flags: Path,
) -> None:
    wf = await create_workflow(redis, settings, pool, linear(waiting(flags / "never")))
    paused = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    async with (
        chromium() as b,
        in_process_worker(settings, sandbox_writable=str(flags)),
        httpx.AsyncClient(base_url=live.base, headers=live.admin, timeout=30) as http,
    ):
        page = b.page
        await b.sign_in(live.base, ADMIN_KEY)
        run = await _execute(http, wf.id)
        await b.open_execution(run["execution_id"])
        await b.wait_graph("running", "a1")
        await page.click("#cancel-btn")
        await b.wait_graph("status", "cancelled")
        await page.wait_for_selector("#detail-status.cancelled")
        assert await page.is_hidden("#cancel-btn")
        assert await b.graph("running") == ""
        task = (await http.get(f"/tasks/{run['task_id']}")).json()
        assert task["status"] == "REVOKED"
        await page.wait_for_selector(f"#recent tr[data-execution='{run['execution_id']}'] td[data-status='cancelled']")
        await b.shot("cancelled")
        # A queued one (its workflow paused, so no worker takes it) never starts.
        assert (await http.post(f"/workflows/{paused.id}/pause")).status_code == 200
        queued = await _execute(http, paused.id)
        await b.open_execution(queued["execution_id"])
        await b.wait_graph("status", "pending")
        await page.click("#cancel-btn")
        await b.wait_graph("status", "cancelled")
        assert (await http.get(f"/tasks/{queued['task_id']}")).json()["status"] == "REVOKED"
        assert (await http.post(f"/workflows/{paused.id}/resume")).status_code == 200
        row = f"#recent tr[data-execution='{queued['execution_id']}']"
        await page.wait_for_selector(f"{row} td[data-status='cancelled']")
        assert await b.graph("path") == ""
    assert b.problems == []


async def test_a_client_session_cannot_see_another_clients_execution(
    live: Live,  # noqa: F811
    redis: Redis,
    settings: Settings,
    pool: asyncpg.Pool,
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("context['x'] = 1"))
    async with (
        chromium() as b,
        in_process_worker(settings),
        httpx.AsyncClient(base_url=live.base, headers=live.admin, timeout=30) as http,
    ):
        keys = {}
        for slug in ("acme", "other"):
            created = await http.post("/clients", json={"slug": slug, "name": slug})
            keys[slug] = created.json()["api_key"]
        mine = await _execute(http, wf.id, client_slug="acme")
        theirs = await _execute(http, wf.id, client_slug="other")
        page = b.page
        await b.sign_in(live.base, keys["acme"])
        assert "client acme" in await page.inner_text("#who")
        assert await page.is_hidden("#cards") and await page.is_hidden("#f-client")
        await page.wait_for_selector(f"#recent tr[data-execution='{mine['execution_id']}']", timeout=WAIT_MS)
        # Executed from the page, a run is the session's client's.
        await page.wait_for_selector(f"#wf-select option[value='{wf.id}']", state="attached")
        await page.click("#run-btn")
        await b.wait_graph("status", "completed")
        rows = await page.locator("#recent tr[data-execution]").evaluate_all("rs => rs.map(r => r.dataset.execution)")
        assert str(mine["execution_id"]) in rows and str(theirs["execution_id"]) not in rows and len(rows) == 2
        clients = await page.locator("#recent tr[data-execution] td:nth-child(3)").all_inner_texts()
        assert set(clients) == {"acme"}
        # Asked directly with the session, the other client's execution does not exist.
        for path in (f"/executions/{theirs['execution_id']}", f"/tasks/{theirs['task_id']}", "/inspect"):
            status = await page.evaluate(f"fetch({path!r}).then(r => r.status)")
            assert status == (403 if path == "/inspect" else 404), path
        await b.shot("client")
    assert b.problems == []
