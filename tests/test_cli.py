"""The `nova` command: help, idempotent migrations, operator commands, and `nova dev` end to end."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from cli.embedded import free_port
from shared.settings import Settings
from tests.support import ROOT, create_workflow, enqueue, in_process_worker, linear, private_dir, wait_terminal


def nova(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("NOVA_") and k not in ("REDIS_URL", "DATABASE_URL")}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        cwd=ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_help_lists_commands_and_settings() -> None:
    out = nova("--help").stdout
    for command in ("dev", "api", "worker", "migrate", "projector", "inspect", "dlq", "clients", "cleanup"):
        assert re.search(rf"^\s+{command}\b", out, re.M), command
    for variable in ("REDIS_URL", "DATABASE_URL", "E2B_API_KEY", "PORT", "NOVA_CONCURRENCY", "NOVA_VISIBILITY_TIMEOUT"):
        assert variable in out


def test_migrate_is_idempotent(db_url: str) -> None:
    # The test database comes migrated; a fresh one shows both runs.
    first = nova("migrate", env={"DATABASE_URL": db_url})
    assert first.returncode == 0 and first.stdout.strip() == "database is up to date"


def test_migrate_fresh_database_then_again(pg_server: object) -> None:
    import asyncpg

    async def fresh() -> str:
        conn = await asyncpg.connect(pg_server.admin_url)  # type: ignore[attr-defined]
        await conn.execute("CREATE DATABASE migrate_twice OWNER nova")
        await conn.close()
        return pg_server.url_for("migrate_twice")  # type: ignore[attr-defined]

    url = asyncio.run(fresh())
    first = nova("migrate", env={"DATABASE_URL": url})
    assert first.returncode == 0 and first.stdout.startswith("applied migrations 1, 2")
    second = nova("migrate", env={"DATABASE_URL": url})
    assert second.returncode == 0 and second.stdout.strip() == "database is up to date"


def test_migrate_reports_an_unreachable_database_in_one_line() -> None:
    result = nova("migrate", env={"DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x"})
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr
    unset = nova("migrate")
    assert unset.returncode == 1 and "DATABASE_URL is not set" in unset.stderr


async def test_inspect_and_dlq_commands_against_a_live_system(redis: Redis, settings: Settings, pool: object) -> None:
    wf = await create_workflow(redis, settings, pool, linear("pass"))
    env = {"REDIS_URL": settings.redis_url or ""}
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf)
        await redis.xadd(settings.requests_stream, {"junk": "entry"})
        await wait_terminal(redis, settings, [task.task_id])
        await redis.xread({settings.dead_letter_stream: "0"}, block=10_000)
        # A consumer that read an entry and went silent: a stuck consumer to spot.
        stuck = await enqueue(redis, settings, wf)
        inspected = await asyncio.to_thread(nova, "inspect", "--json", env=env)
    report = json.loads(inspected.stdout)
    # The normal lane's requests stream and the results stream (each lane's stream has a group too).
    groups = {g["group"]: g for g in report["groups"] if g["stream"] in ("nova:requests", "nova:results")}
    assert report["dead_letters"] == 1 and groups["nova-workers"]["consumers"] >= 1
    del stuck
    text = await asyncio.to_thread(nova, "inspect", env=env)
    assert "nova-workers" in text.stdout and "dead letters:    1" in text.stdout
    listed = await asyncio.to_thread(nova, "dlq", "list", "--json", env=env)
    [letter] = json.loads(listed.stdout)
    assert letter["reason"] == "malformed"
    replay = await asyncio.to_thread(nova, "dlq", "replay", letter["id"], env=env)
    assert replay.returncode == 1 and "not a complete request" in replay.stderr
    purged = await asyncio.to_thread(nova, "dlq", "purge", "--yes", env=env)
    assert purged.stdout.strip() == "purged 1 dead letter(s)"
    down = await asyncio.to_thread(nova, "inspect", env={"REDIS_URL": f"redis://127.0.0.1:{free_port()}"})
    assert down.returncode == 1 and "unreachable" in down.stderr


def _check_locked(data: Path, lines: list[str]) -> None:
    """nova dev's servers as node code would find them: logins required, the app's without admin rights."""
    import asyncpg
    from redis import Redis as SyncRedis
    from redis.exceptions import AuthenticationError, NoPermissionError

    def printed(label: str) -> str:
        return next(line.split()[-1] for line in lines if line.strip().startswith(label + " "))

    redis_url, pg_url = printed("Redis"), printed("PostgreSQL")
    assert redis_url.startswith("redis://nova:") and pg_url.startswith("postgresql://nova:")
    app = SyncRedis.from_url(redis_url)
    anonymous = SyncRedis(host="127.0.0.1", port=app.connection_pool.connection_kwargs["port"])
    try:
        with pytest.raises(NoPermissionError):
            app.config_set("dir", "/tmp")
        with pytest.raises(AuthenticationError):
            anonymous.ping()
    finally:
        app.close()
        anonymous.close()
    for path in (data / "redis").rglob("*"):
        assert path.stat().st_mode & 0o077 == 0, path

    async def role() -> bool:
        conn = await asyncpg.connect(pg_url)
        try:
            return bool(await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))
        finally:
            await conn.close()

    assert asyncio.run(role()) is False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(180)
def test_nova_dev_runs_the_printed_curl_to_success_and_stops_cleanly() -> None:
    # Outside pytest's temp tree: nova dev's PostgreSQL must keep access to its data (see private_dir).
    with private_dir("dev") as data:
        _run_nova_dev(data)


def _run_nova_dev(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOVA_") and k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(NOVA_DATA_DIR=str(tmp_path / "data"), PORT=str(port))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "dev"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, f"nova dev ended early: {''.join(lines)}"
            lines.append(line)
            if line.startswith("Ctrl-C stops"):
                break
        printed = "".join(lines)
        curl = next(line for line in lines if line.startswith("curl -s -X POST"))
        args = shlex.split(curl)
        url = args[args.index("POST") + 1]
        headers = dict(h.split(": ", 1) for h in (args[i + 1] for i, a in enumerate(args) if a == "-H"))
        body = json.loads(args[args.index("-d") + 1])
        accepted = httpx.post(url, json=body, headers=headers, timeout=10)
        assert accepted.status_code == 202, accepted.text
        task_id = accepted.json()["task_id"]
        assert f"http://127.0.0.1:{port}/docs" in printed and "redis://" in printed and "postgresql://" in printed
        _check_locked(tmp_path / "data", lines)
        assert f"curl -s -X POST http://127.0.0.1:{port}/webhooks" in printed  # the webhook example
        status = {}
        for _ in range(200):
            status = httpx.get(f"http://127.0.0.1:{port}/tasks/{task_id}", headers=headers, timeout=10).json()
            if status["status"] in ("SUCCESS", "FAILURE", "DEAD"):
                break
            time.sleep(0.05)
        assert status["status"] == "SUCCESS", status
        final = status["result"]["final_context"]
        assert final["total"] == 1315.0 and final["status"] == "pending_approval"
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0
    assert not _port_open(port)
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True, check=False).stdout
    assert leftovers.strip() == ""


async def test_clients_commands_create_list_and_rotate(settings: Settings, redis: Redis, pool: object) -> None:
    from shared.clients import ClientStore, Vault
    from shared.streams import Keys

    env = {"REDIS_URL": settings.redis_url or "", "DATABASE_URL": settings.database_url or ""}
    created = await asyncio.to_thread(nova, "clients", "create", "acme", "--name", "Acme Corp", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    store = ClientStore(redis, pool, Keys.from_settings(settings), Vault(None))  # type: ignore[arg-type]
    assert await store.resolve(key) == "acme"
    listed = await asyncio.to_thread(nova, "clients", "list", env=env)
    assert "acme" in listed.stdout and "Acme Corp" in listed.stdout and "active keys: 1" in listed.stdout
    again = await asyncio.to_thread(nova, "clients", "create", "acme", "--name", "Acme Corp", env=env)
    assert again.returncode == 1 and "already exists" in again.stderr
    rotated = await asyncio.to_thread(nova, "clients", "rotate-key", "acme", env=env)
    new_key = rotated.stdout.strip().splitlines()[-1]
    assert await store.resolve(new_key) == "acme" and await store.resolve(key) is None


async def test_cleanup_dry_run_says_what_would_go_and_deletes_nothing(
    settings: Settings, redis: Redis, pool: object
) -> None:
    from datetime import timedelta

    from tests.test_retention import ids, seed

    wf = await create_workflow(redis, settings, pool, linear("pass"))
    await seed(pool, wf.id, 1, 4, "completed", timedelta(days=45))  # type: ignore[arg-type]
    await seed(pool, wf.id, 5, 6, "running", timedelta(days=45))  # type: ignore[arg-type]
    await seed(pool, wf.id, 7, 7, "failed", timedelta(days=3))  # type: ignore[arg-type]
    await seed(pool, wf.id, 8, 8, "completed", timedelta(hours=1))  # type: ignore[arg-type]
    env = {"REDIS_URL": settings.redis_url or "", "DATABASE_URL": settings.database_url or ""}
    # Side by side where they cannot interfere: each command is a new interpreter (slow under load).
    dry, shorter = await asyncio.gather(
        asyncio.to_thread(nova, "cleanup", "--dry-run", env=env),
        asyncio.to_thread(nova, "cleanup", "--dry-run", "--days", "2", "--json", env=env),
    )
    assert dry.returncode == 0, dry.stderr
    assert re.search(r"executions\s+4\b", dry.stdout) and re.search(r"node_runs\s+8\b", dry.stdout), dry.stdout
    assert "would delete" in dry.stdout and re.search(r"oldest: \d{4}-\d\d-\d\d", dry.stdout)
    assert await ids(pool) == set(range(1, 9))  # type: ignore[arg-type]
    assert json.loads(shorter.stdout)["executions"] == 5
    done = await asyncio.to_thread(nova, "cleanup", env=env)
    assert done.returncode == 0 and re.search(r"executions\s+4\b", done.stdout), done.stdout
    assert await ids(pool) == {5, 6, 7, 8}  # type: ignore[arg-type]
    off, down = await asyncio.gather(
        asyncio.to_thread(nova, "cleanup", env={**env, "NOVA_RETENTION_DAYS": "0"}),
        asyncio.to_thread(nova, "cleanup", env={**env, "DATABASE_URL": f"postgresql://nova@127.0.0.1:{free_port()}/x"}),
    )
    assert off.returncode == 0 and "everything is kept" in off.stdout
    assert down.returncode == 1 and down.stderr.startswith("error:") and "Traceback" not in down.stderr


async def test_webhooks_commands_add_list_deliveries_replay_delete(
    settings: Settings, redis: Redis, pool: object
) -> None:
    from standardwebhooks import Webhook

    from shared.streams import Keys
    from shared.webhooks import WebhookRegistry
    from tests.support import SECRETS_KEY
    from tests.test_webhooks import Receiver, until

    receiver = Receiver()
    receiver.thread.start()
    hooks = settings.model_copy(
        update={"webhook_allow": "127.0.0.1", "webhook_retry_for": 0.3, "webhook_backoff": 0.05, "webhook_timeout": 2}
    )
    env = {
        "REDIS_URL": settings.redis_url or "",
        "DATABASE_URL": settings.database_url or "",
        "NOVA_WEBHOOK_ALLOW": "127.0.0.1",
        "NOVA_SECRETS_KEY": SECRETS_KEY,
    }

    async def run(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(nova, "webhooks", *args, env=env)

    try:
        # Each command is a new interpreter (seconds on a loaded machine): the refusals run side by side,
        # and the event-type rules are tested without a process (test_endpoint_event_types_...).
        bad, inside, nobody = await asyncio.gather(
            run("add", receiver.url("/h"), "--event", "execution.finished"),
            run("add", "http://10.1.2.3/hook"),
            run("add", receiver.url("/h"), "--client", "nobody"),
        )
        assert bad.returncode == 2 and "unknown event type(s) execution.finished" in bad.stderr
        assert inside.returncode == 1 and "refused" in inside.stderr and "Traceback" not in inside.stderr
        assert nobody.returncode == 1 and "client 'nobody' not found" in nobody.stderr

        added = await run("add", receiver.url("/h"), "--event", "execution.succeeded", "--description", "ops")
        assert added.returncode == 0, added.stderr
        endpoint_id = added.stdout.split()[1]
        receiver.secrets["/h"] = added.stdout.strip().splitlines()[-1]
        assert receiver.secrets["/h"].startswith("whsec_")
        listed = await run("list", "--json")
        [shown] = json.loads(listed.stdout)
        assert shown["id"] == endpoint_id and shown["event_types"] == ["execution.succeeded"] and "secret" not in shown

        # Rotated with a grace period: the receiver, still on the old secret, keeps verifying.
        rotated = await run("rotate-secret", endpoint_id, "--grace", "600")
        assert rotated.returncode == 0 and "signs beside the new one until" in rotated.stdout, rotated.stderr
        new_secret = rotated.stdout.strip().splitlines()[-1]
        assert new_secret.startswith("whsec_") and new_secret != receiver.secrets["/h"]
        receiver.default["/h"] = "500"
        wf = await create_workflow(redis, settings, pool, linear("pass"))
        async with in_process_worker(hooks):
            task = await enqueue(redis, settings, wf)
            await wait_terminal(redis, settings, [task.task_id])

            registry = WebhookRegistry(redis, Keys.from_settings(settings), hooks)

            async def dead() -> bool:
                # Polled in-process (a command per poll would cost an interpreter start each).
                return any(d["state"] == "dead" for d in await registry.deliveries(endpoint_id))

            await until(dead)
            [parked] = json.loads((await run("deliveries", endpoint_id, "--json")).stdout)
            assert parked["state"] == "dead" and parked["payload"]["data"]["task_id"] == task.task_id
            text = await run("deliveries", endpoint_id)
            assert f"{parked['id']}  dead" in text.stdout and "HTTP 500" in text.stdout
            receiver.default["/h"] = "ok"
            replayed = await run("replay", endpoint_id, str(parked["id"]))
            assert replayed.returncode == 0, replayed.stderr
            await until(lambda: parked["id"] in receiver.accepted("/h"))
        [(_, headers, body, _)] = [r for r in receiver.requests if r[3] == "ok"]
        assert len(headers["webhook-signature"].split(" ")) == 2
        Webhook(new_secret).verify(body, headers)  # the new secret verifies it too
        again = await run("replay", endpoint_id, str(parked["id"]))
        assert again.returncode == 1 and "no dead delivery" in again.stderr
        assert receiver.bad_signatures == []
        deleted = await run("delete", endpoint_id)
        assert deleted.returncode == 0 and await registry.get(endpoint_id) is None
        gone = await run("deliveries", endpoint_id)
        assert gone.returncode == 1 and f"webhook {endpoint_id} not found" in gone.stderr
    finally:
        receiver.release.set()
        receiver.server.shutdown()
        receiver.server.server_close()


def _dev_env(data: Path, port: int) -> dict[str, str]:
    return {"NOVA_DATA_DIR": str(data), "PORT": str(port)}


def test_nova_dev_refuses_a_busy_port_at_once(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = nova("dev", env=_dev_env(tmp_path / "data", port))
    assert result.returncode == 1
    assert f"error: port {port} is already in use" in result.stderr and "--port" in result.stderr
    # Refused before anything started: no server data, no wait for a health check.
    assert not (tmp_path / "data" / "redis").exists() and not (tmp_path / "data" / "postgres").exists()
    assert "did not become healthy" not in result.stderr


def test_nova_dev_refuses_a_data_folder_another_nova_dev_holds(tmp_path: Path) -> None:
    import fcntl

    from cli.dev import LOCK_FILE

    data = tmp_path / "data"
    data.mkdir()
    # Another `nova dev`: a process holding the folder's lock (as a running one does), with its pid.
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl,sys,time; f=open({str(data / LOCK_FILE)!r},'w'); "
         "fcntl.flock(f, fcntl.LOCK_EX); f.write('4242'); f.flush(); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = nova("dev", env=_dev_env(data, free_port()))
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1
    assert f"the data folder {data} is in use by another `nova dev` (pid 4242)" in result.stderr
    assert "NOVA_DATA_DIR" in result.stderr
    assert not (data / "redis").exists() and not (data / "postgres").exists()
    # Once the holder is gone, the folder is free again (the lock dies with its process).
    with open(data / LOCK_FILE, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_endpoint_event_types_the_api_and_the_cli_share() -> None:
    from shared.webhooks import InvalidEndpoint, WebhookEvent, endpoint_event_types

    assert endpoint_event_types(None, None) == sorted(e.value for e in WebhookEvent)
    assert "workers.unavailable" not in endpoint_event_types(None, "acme")  # a client's default
    assert endpoint_event_types(["node.failed", "node.failed"], "acme") == ["node.failed"]
    with pytest.raises(InvalidEndpoint, match="operators' endpoints"):
        endpoint_event_types(["workers.unavailable"], "acme")
    with pytest.raises(InvalidEndpoint, match=r"unknown event type\(s\) bogus; known: execution.succeeded"):
        endpoint_event_types(["bogus", "node.failed"], None)
    with pytest.raises(InvalidEndpoint, match="at least one"):
        endpoint_event_types([], None)
