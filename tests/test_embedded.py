"""The embedded servers (`nova dev`, the suite) are locked: node code on the same machine reaches their
ports, so neither may let it in without a password nor hand the app's login admin powers.

Each attack here worked against the servers as they were (Redis without a password, running as root,
AOF 0644; PostgreSQL with `trust` and the app as superuser).
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from cli.embedded import APP_USER, PostgresServer, RedisServer
from shared.events import EventType
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import Keys
from tests.support import create_workflow, enqueue, in_process_worker, redis_binaries, redis_version, wait_terminal

AS_ROOT = os.geteuid() == 0


@pytest.fixture(params=redis_binaries(), ids=redis_version)
def locked_redis(request: pytest.FixtureRequest, redis_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_factory(binary=request.param, appendonly=True)


@pytest.fixture
async def app_client(locked_redis: RedisServer) -> Iterator[Redis]:
    client = Redis.from_url(locked_redis.url, decode_responses=True)
    yield client  # type: ignore[misc]
    await client.aclose()


# The commands of the attack (CONFIG SET dir + SAVE writes a file anywhere the server may write;
# MODULE LOAD runs code in the server) and the others that would let node code wreck the server.
REFUSED = [
    ("CONFIG", "SET", "dir", "/tmp"),
    ("CONFIG", "SET", "dbfilename", "authorized_keys"),
    ("MODULE", "LOAD", "/tmp/evil.so"),
    ("DEBUG", "SLEEP", "0"),
    ("SHUTDOWN", "NOSAVE"),
    ("FLUSHALL",),
    ("SAVE",),
    ("BGSAVE",),
    ("BGREWRITEAOF",),
    ("ACL", "SETUSER", "nova", "+@all"),
    ("REPLICAOF", "127.0.0.1", "1"),
]


@pytest.mark.parametrize("command", REFUSED, ids=lambda c: " ".join(c[:2]))
async def test_the_app_user_cannot_run_admin_commands(
    command: tuple[str, ...], locked_redis: RedisServer, app_client: Redis
) -> None:
    # Redis 7 also refuses MODULE and DEBUG to everyone by default (enable-*-command no): either way
    # the command does not run.
    with pytest.raises(ResponseError, match=r"NOPERM|no permissions|command not allowed") as refused:
        await app_client.execute_command(*command)
    assert isinstance(refused.value, NoPermissionError) or "not allowed" in str(refused.value)
    assert locked_redis.running


async def test_lua_runs_under_the_callers_rights(app_client: Redis) -> None:
    # A script is no way around the ACL: redis.call checks the calling user's rights.
    with pytest.raises(ResponseError, match=r"(?i)permission|not allowed"):
        await app_client.eval("return redis.call('CONFIG', 'SET', 'dir', '/tmp')", 0)


async def test_the_app_user_can_run_what_nova_uses(locked_redis: RedisServer, app_client: Redis) -> None:
    keys = Keys.from_settings(Settings(redis_url=locked_redis.url))
    scripts = Scripts(app_client, keys)
    await scripts.raise_sequence(5)  # SCRIPT LOAD / EVALSHA
    assert await app_client.xadd("s", {"a": "1"})
    assert "uptime_in_seconds" in await app_client.info("server")
    assert await app_client.config_get("appendfsync") == {"appendfsync": "everysec"}  # strict durability
    assert await app_client.wait(0, 10) == 0
    # CONFIG GET holds no secret: the passwords are ACL users' (as hashes), not config.
    everything = str(await app_client.config_get("*"))
    assert locked_redis.admin_password not in everything and locked_redis.app_password not in everything


async def test_a_connection_without_the_password_is_refused(locked_redis: RedisServer) -> None:
    # No retries: a refused login is final, and redis-py would otherwise back off and try again.
    once = Retry(NoBackoff(), 0)
    anonymous = Redis(host="127.0.0.1", port=locked_redis.port, retry=once)
    wrong = Redis.from_url(locked_redis.url.replace(locked_redis.app_password, "guess"), retry=once)
    try:
        with pytest.raises(AuthenticationError):
            await anonymous.execute_command("CONFIG", "SET", "dir", "/tmp")
        with pytest.raises(AuthenticationError):
            await wrong.ping()
    finally:
        await anonymous.aclose()
        await wrong.aclose()


async def test_passwords_are_not_on_the_command_line(locked_redis: RedisServer) -> None:
    # /proc/<pid>/cmdline is readable by every local user, sandboxes included.
    assert locked_redis.proc is not None
    cmdline = Path(f"/proc/{locked_redis.proc.pid}/cmdline").read_text()
    for secret in (locked_redis.admin_password, locked_redis.app_password, locked_redis.replication_password):
        assert secret not in cmdline


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


async def test_data_files_are_the_servers_own(locked_redis: RedisServer, app_client: Redis) -> None:
    await app_client.set("token", "secret")
    admin = Redis.from_url(locked_redis.admin_url)
    await admin.bgrewriteaof()
    await admin.aclose()
    locked_redis.stop()  # SIGTERM flushes the AOF
    files = _files(locked_redis.data_dir)
    assert any("appendonly" in p.name for p in files)
    owner = locked_redis.user.pw_uid if locked_redis.user else os.geteuid()
    for path in [locked_redis.data_dir, *files]:
        info = path.stat()
        assert info.st_uid == owner, path
        assert stat.S_IMODE(info.st_mode) & 0o077 == 0, (path, oct(info.st_mode))


@pytest.mark.skipif(not AS_ROOT, reason="as another user the server runs as that user")
def test_as_root_redis_runs_unprivileged(locked_redis: RedisServer) -> None:
    assert locked_redis.proc is not None
    status = Path(f"/proc/{locked_redis.proc.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    assert "0" not in uids and locked_redis.user is not None
    assert set(uids) == {str(locked_redis.user.pw_uid)}


def test_an_aof_left_readable_by_an_older_version_is_locked_at_start(redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory(appendonly=True)
    server.stop()
    assert any("appendonly" in p.name for p in _files(server.data_dir))
    for path in _files(server.data_dir):
        path.chmod(0o644)
    server.data_dir.chmod(0o755)
    server.start()
    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
    for path in _files(server.data_dir):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.skipif(not AS_ROOT, reason="needs another uid to read as")
def test_another_uid_cannot_read_the_aof(redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory(appendonly=True)
    server.stop()  # SIGTERM: the AOF is on disk (Redis 7 may still be writing its first one at start)
    aof = next(p for p in _files(server.data_dir) if "appendonly" in p.name)
    # As a sandbox would: some other unprivileged uid.
    result = subprocess.run(
        ["cat", str(aof)], user=65533, group=65533, extra_groups=[], capture_output=True, check=False
    )
    assert result.returncode != 0 and b"Permission denied" in result.stderr


# ---- PostgreSQL -------------------------------------------------------------------------------------


@pytest.fixture
def locked_pg(pg_factory: Callable[..., PostgresServer]) -> PostgresServer:
    return pg_factory()


async def test_postgres_refuses_connections_without_the_password(locked_pg: PostgresServer) -> None:
    for user in ("postgres", APP_USER):
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(host="127.0.0.1", port=locked_pg.port, user=user, database="postgres", password="")
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(host="127.0.0.1", port=locked_pg.port, user=user, database="postgres", password="x")
    # Not on its socket either (trust there would be a way around, for whoever can reach the folder).
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(host=str(locked_pg.socket_dir), port=locked_pg.port, user="postgres", password="")


async def test_the_app_role_owns_its_database_and_is_not_a_superuser(locked_pg: PostgresServer) -> None:
    conn = await asyncpg.connect(locked_pg.url)
    try:
        row = await conn.fetchrow(
            "SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb, pg_get_userbyid(d.datdba) AS owner"
            " FROM pg_roles r, pg_database d WHERE r.rolname = current_user AND d.datname = current_database()"
        )
        assert (row["rolsuper"], row["rolcreaterole"], row["rolcreatedb"]) == (False, False, False)
        assert row["owner"] == APP_USER
        # What a superuser could do from node code with the app's login: run a program as the server.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("COPY (SELECT 1) TO PROGRAM 'true'")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CREATE ROLE intruder SUPERUSER LOGIN")
        await conn.execute("CREATE TABLE own (x int)")  # the owner builds its schema (migrations)
    finally:
        await conn.close()


def test_postgres_data_files_are_the_servers_own(locked_pg: PostgresServer) -> None:
    owner = locked_pg.user.pw_uid if locked_pg.user else os.geteuid()
    files = _files(locked_pg.pgdata)
    assert any(p.name == "pg_hba.conf" for p in files)
    for path in [locked_pg.pgdata, *files]:
        info = path.stat()
        assert info.st_uid == owner, path
        assert stat.S_IMODE(info.st_mode) & 0o077 == 0, (path, oct(info.st_mode))
    # Ours, not the server's (it cannot read the passwords back), and nobody else's either.
    for path in (locked_pg.credentials_path, locked_pg.log_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


async def test_postgres_passwords_survive_a_restart(locked_pg: PostgresServer) -> None:
    url = locked_pg.url
    locked_pg.stop()
    again = PostgresServer(locked_pg.data_dir, port=locked_pg.port, bindir=locked_pg.bindir, durable=False).start()
    try:
        assert again.url == url
        conn = await asyncpg.connect(url)
        assert await conn.fetchval("SELECT current_user") == APP_USER
        await conn.close()
    finally:
        again.stop()
    assert stat.S_IMODE(locked_pg.credentials_path.stat().st_mode) == 0o600


async def test_a_data_folder_from_an_older_version_is_locked_at_start(locked_pg: PostgresServer) -> None:
    # What an older `nova dev` left: trust everywhere and no credentials file.
    locked_pg.stop()
    locked_pg.credentials_path.unlink()
    (locked_pg.pgdata / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    locked_pg.start()
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(host="127.0.0.1", port=locked_pg.port, user="postgres", database="postgres", password="")
    conn = await asyncpg.connect(locked_pg.url)
    assert await conn.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user") is False
    await conn.close()


# ---- as hostile node code, through the real pipeline ------------------------------------------------

HOSTILE = r"""
import socket, struct

def redis_says(port, *command):
    s = socket.create_connection(('127.0.0.1', port), timeout=5)
    frame = b'*%d\r\n' % len(command) + b''.join(b'$%d\r\n%s\r\n' % (len(a), a.encode()) for a in command)
    s.sendall(frame)
    reply = s.recv(200).decode(errors='replace')
    s.close()
    return reply

def postgres_auth_request(port, user):
    # A StartupMessage (protocol 3.0); the first reply says which authentication the server wants:
    # 'R' with code 0 is AuthenticationOk (trust), 10 is SASL (scram).
    body = struct.pack('!i', 196608) + b'user\0' + user.encode() + b'\0database\0postgres\0\0'
    s = socket.create_connection(('127.0.0.1', port), timeout=5)
    s.sendall(struct.pack('!i', len(body) + 4) + body)
    kind = s.recv(1)
    length = struct.unpack('!i', s.recv(4))[0]
    code = struct.unpack('!i', s.recv(4))[0] if kind == b'R' else -1
    s.close()
    return kind.decode() + str(code)

context['config'] = redis_says(context['redis_port'], 'CONFIG', 'SET', 'dir', '/tmp')
context['module'] = redis_says(context['redis_port'], 'MODULE', 'LOAD', '/tmp/evil.so')
context['pg'] = postgres_auth_request(context['pg_port'], 'postgres')
"""


async def test_node_code_gets_nothing_from_the_servers(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, redis_server: RedisServer, pg_server: PostgresServer
) -> None:
    wf = await create_workflow(redis, settings, pool, {"nodes": [
        {"id": "start", "type": "start", "next": "evil"},
        {"id": "evil", "type": "action", "code": HOSTILE, "next": "end"},
        {"id": "end", "type": "end"},
    ], "edges": []})  # fmt: skip
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {"redis_port": redis_server.port, "pg_port": pg_server.port})
        events = await asyncio.wait_for(wait_terminal(redis, settings, [task.task_id]), 60)
    event = events[task.task_id]
    final = event.data.get("final_context") or {}
    if event.type != EventType.SUCCEEDED:
        # A sandbox with no route to the host's loopback fails the node before any answer: the
        # servers were never reached, which holds as well.
        unreachable = ("PermissionError", "ConnectionRefusedError", "Network is unreachable", "timed out")
        assert any(word in str(event.data) for word in unreachable), event.data
        return
    assert final["config"].startswith("-NOAUTH"), final
    # Redis 7 refuses MODULE to anyone before it asks for a login.
    assert final["module"].startswith(("-NOAUTH", "-ERR MODULE command not allowed")), final
    assert final["pg"] == "R10", final  # SASL (scram), not 'R0' (trust)
