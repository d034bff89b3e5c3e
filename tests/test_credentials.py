"""Credentials the NOVA way: in the context under their stored names, typed as stored, with
client_slug; secrets masked in everything shown; the checkpoint keeps true values, encrypted."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis

from consumer.engine import Checkpoint
from consumer.runs import SEALED_CHECKPOINT, read_checkpoint
from consumer.sandbox.base import NodeResult, Sandbox, SandboxInfraError, SandboxProvider, SandboxSpec
from consumer.sandbox.local import LocalSandboxProvider
from shared.clients import ClientCredentials, ClientError, ClientStore, Credential, Vault, secret_by_default
from shared.masking import MASK, Masker
from shared.settings import Settings
from shared.streams import EventType, Keys, TaskField, dumps
from tests.support import (
    SECRETS_KEY,
    create_workflow,
    enqueue,
    in_process_worker,
    linear,
    wait_for_events,
    wait_projected,
    wait_terminal,
)

# A quote, a slash and an '@' make the escaped forms (JSON, URL) differ from the raw value. Each
# holds a marker without special characters, found in any form the secret takes (raw, escaped, repr'd).
PASSWORD = 'pw-Sup3r/S3cret"mail@x'
DB_PASSWORD = "db-9f8e7d6c-pass"
MARKERS = ("Sup3r", "9f8e7d6c")


def store(redis: Redis, pool: asyncpg.Pool, settings: Settings) -> ClientStore:
    return ClientStore(redis, pool, Keys.from_settings(settings), Vault(SECRETS_KEY))


async def nova_client(redis: Redis, pool: asyncpg.Pool, settings: Settings, slug: str = "acme") -> None:
    """A client with NOVA's email and database credentials, each kind by its name's default."""
    clients = store(redis, pool, settings)
    await clients.create(slug, slug.title())
    for name, value in {
        "email_user": "invoices@acme.test",
        "email_password": PASSWORD,
        "imap_host": "imap.acme.test",
        "imap_port": 993,
        "smtp_port": 587,
        "sender_whitelist": None,
        "db_password": DB_PASSWORD,
    }.items():
        await clients.set_credential(slug, name, value)


async def everything_shown(
    redis: Redis, settings: Settings, pool: asyncpg.Pool, api: httpx.AsyncClient, task_id: str, execution_id: int
) -> list[str]:
    """Every place a run is shown or projected, as text."""
    seen = [str(fields) for _, fields in await redis.xrange(settings.results_stream)]
    task = await redis.hgetall(Keys.from_settings(settings).task(task_id))
    seen.append(str(task))
    seen.extend(str(dict(r)) for r in await pool.fetch("SELECT * FROM executions"))
    seen.extend(str(dict(r)) for r in await pool.fetch("SELECT * FROM node_runs"))
    seen.extend(str(dict(r)) for r in await pool.fetch("SELECT * FROM client_credentials"))
    for path in (f"/tasks/{task_id}", f"/executions/{execution_id}"):
        response = await api.get(path)
        assert response.status_code == 200, response.text
        seen.append(response.text)
    return seen


def leaks(seen: list[str]) -> list[str]:
    return [text[:300] for text in seen for marker in MARKERS if marker in text]


# ---- the masker on its own -------------------------------------------------------------------------


def test_masker_hides_secrets_printed_copied_nested_and_inside_text() -> None:
    masker = Masker(["hunter2-secret", 48213907], hidden_keys=["email_password", "imap_host"], keep=["acme"])
    context = {
        "email_password": "hunter2-secret",
        "imap_host": "imap.test",
        "copy": "hunter2-secret",
        "nested": {"list": [{"url": "imap://u:hunter2-secret@h"}], "hunter2-secret": 1},
        "pin": 48213907,
        "count": 148213907,
        "printed_json": json.dumps({"p": 'x"hunter2-secret'}),
        "url": "postgres://u:" + quote("hunter2-secret", safe="") + "@db",
        "repr": repr(["hunter2-secret"]),
        "ok": True,
        "n": 12,
    }
    shown = masker.context(context)
    assert shown == {
        "copy": MASK,
        "nested": {"list": [{"url": f"imap://u:{MASK}@h"}], MASK: 1},
        "pin": MASK,
        "count": 148213907,
        "printed_json": json.dumps({"p": f'x"{MASK}'}),
        "url": f"postgres://u:{MASK}@db",
        "repr": repr([MASK]),
        "ok": True,
        "n": 12,
    }
    # The context itself is left as it was: the run keeps working with true values.
    assert context["copy"] == "hunter2-secret"
    assert (
        masker.text("Traceback ...\nValueError: refused hunter2-secret") == f"Traceback ...\nValueError: refused {MASK}"
    )


def test_masker_rules_short_longest_first_slug_and_structural_fields() -> None:
    masker = Masker(["abc", "token-1234", "token-1234-extended", "acme"], hidden_keys=["api_key"], keep=["acme"])
    # Under 4 characters a value is not searched for (its key is still dropped); the longest match wins;
    # a secret equal to the client's slug is the tenant's public name and stays readable.
    assert masker.text("abc token-1234-extended token-1234 acme") == f"abc {MASK} {MASK} acme"
    assert masker.context({"api_key": "abc", "x": "abc"}) == {"x": "abc"}
    # The run's bookkeeping keeps its types; everything else (a field added later too) is masked.
    data = {"step": 1234, "duration_ms": 1234.5, "stdout": "token-1234\n", "message": "1234", "output_context": {}}
    shown = {**data, "stdout": f"token-{MASK}\n", "message": MASK}
    assert Masker(["1234"]).event_data(data) == shown
    # Without secrets nothing is copied or changed.
    assert Masker().event_data(data) is data and Masker().value(data) is data


def test_credentials_kinds_context_and_environment() -> None:
    for name in ("email_user", "imap_host", "imap_port", "smtp_host", "smtp_port", "sender_whitelist", "db_host"):
        assert not secret_by_default(name) and not secret_by_default(name.upper())
    for name in ("email_password", "db_password", "api_key", "GCP_SERVICE_ACCOUNT_JSON", "anything_else"):
        assert secret_by_default(name)
    creds = ClientCredentials(
        "acme",
        {
            "imap_port": Credential(993, secret=False),
            "email_password": Credential("pw-long-enough", secret=True),
            "schemas": Credential({"t": ["a"]}, secret=False),
            "sender_whitelist": Credential(None, secret=False),
        },
    )
    assert creds.context() == {
        "imap_port": 993,
        "email_password": "pw-long-enough",
        "schemas": {"t": ["a"]},
        "sender_whitelist": None,
    }
    assert creds.environment() == {"imap_port": "993", "email_password": "pw-long-enough", "schemas": '{"t":["a"]}'}
    # Each node gets its own copy: one node cannot change what the next receives.
    creds.context()["schemas"]["t"].append("b")
    assert creds.context()["schemas"] == {"t": ["a"]}
    assert creds.has_secrets and creds.masker().text("pw-long-enough 993") == f"{MASK} 993"


# ---- storing -----------------------------------------------------------------------------------------


async def test_credentials_are_stored_typed_with_their_kind(
    redis: Redis, pool: asyncpg.Pool, settings: Settings
) -> None:
    clients = store(redis, pool, settings)
    await nova_client(redis, pool, settings)
    await clients.set_credential("acme", "imap_host", "imap.other.test", secret=True)
    await clients.set_credential("acme", "api_token", "tok-123456", secret=False)
    creds = await clients.credentials_for("acme")
    assert creds.items["imap_port"] == Credential(993, secret=False)
    assert creds.items["sender_whitelist"] == Credential(None, secret=False)
    assert creds.items["email_password"] == Credential(PASSWORD, secret=True)
    assert creds.items["imap_host"] == Credential("imap.other.test", secret=True)
    assert creds.items["api_token"] == Credential("tok-123456", secret=False)
    # Kinds are listed without decrypting anything; values stay encrypted at rest.
    assert (await clients.credential_kinds("acme"))["email_password"] is True
    stored = str([dict(r) for r in await pool.fetch("SELECT * FROM client_credentials")])
    assert PASSWORD not in stored and json.dumps(PASSWORD)[1:-1] not in stored
    # The kind in clear only serves listings: flipping it does not unmask a secret.
    key = f"{settings.key_prefix}:credentials:acme"
    await redis.hset(key, "email_password", "setting:" + (await redis.hget(key, "email_password")).partition(":")[2])
    assert (await clients.credential_kinds("acme"))["email_password"] is False
    assert (await clients.credentials_for("acme")).items["email_password"].secret is True
    # A credential stored before values were typed: a bare token holding the string.
    await redis.hset(f"{settings.key_prefix}:credentials:acme", "db_host", Vault(SECRETS_KEY).encrypt("db.acme"))
    await redis.hset(f"{settings.key_prefix}:credentials:acme", "OLD_TOKEN", Vault(SECRETS_KEY).encrypt("t-0987"))
    creds = await clients.credentials_for("acme")
    assert creds.items["db_host"] == Credential("db.acme", secret=False)
    assert creds.items["OLD_TOKEN"] == Credential("t-0987", secret=True)
    for name, value in (("client_slug", "x"), ("1abc", "x"), ("bad-name", "x"), ("ok", ""), ("ok", "x" * 70_000)):
        with pytest.raises(ClientError):
            await clients.set_credential("acme", name, value)


async def test_credential_route_takes_typed_values_and_the_secret_flag(
    api: httpx.AsyncClient, redis: Redis, pool: asyncpg.Pool, settings: Settings
) -> None:
    assert (await api.post("/clients", json={"slug": "acme", "name": "Acme"})).status_code == 201
    for name, body in (
        ("imap_port", {"value": 993}),
        ("email_password", {"value": PASSWORD}),
        ("webhook_url", {"value": "https://hooks.acme.test/x", "secret": False}),
        ("database_schemas", {"value": {"invoices": "id int"}}),
    ):
        response = await api.put(f"/clients/acme/credentials/{name}", json=body)
        assert response.status_code == 204, response.text
    listed = (await api.get("/clients/acme/credentials")).json()
    assert listed["items"] == ["database_schemas", "email_password", "imap_port", "webhook_url"]
    assert {c["name"]: c["secret"] for c in listed["credentials"]} == {
        "database_schemas": False,
        "email_password": True,
        "imap_port": False,
        "webhook_url": False,
    }
    assert PASSWORD not in str(listed)
    creds = await store(redis, pool, settings).credentials_for("acme")
    assert creds.items["imap_port"].value == 993 and creds.items["database_schemas"].value == {"invoices": "id int"}
    for name, body, fragment in (
        ("client_slug", {"value": "x"}, "set by NOVA"),
        ("bad-name", {"value": "x"}, "environment variable names"),
        ("ok", {"value": ""}, "value"),
        ("ok", {"secret": True}, "value"),
        # An environment variable cannot hold U+0000: stored, it failed every run's sandbox start.
        ("ok", {"value": "a\u0000b"}, "U+0000"),
        ("bad%00name", {"value": "x"}, "environment variable names"),
        ("token%0A", {"value": "x"}, "environment variable names"),  # `$` matched before a final newline
    ):
        response = await api.put(f"/clients/acme/credentials/{name}", json=body)
        assert response.status_code == 422 and fragment in response.text, response.text
    # Path values no client or credential can have (U+0000 made PostgreSQL fail the request) are a 422.
    for method, path in (
        ("PUT", "/clients/a%00b/credentials/ok"),
        ("POST", "/clients/a%00b/rotate-key"),
        ("GET", "/clients/a%00b/credentials"),
        ("DELETE", "/clients/a%00b/credentials/ok"),
        ("DELETE", "/clients/acme/credentials/%00"),
    ):
        response = await api.request(method, path, json={"value": "x"} if method == "PUT" else None)
        assert response.status_code == 422 and "pattern" in response.text, (method, path, response.text)


# ---- runs ----------------------------------------------------------------------------------------------

NODE_READS_CREDENTIALS = """
import json, os, sys
from urllib.parse import quote
context['port_is_int'] = type(context['imap_port']) is int and context['imap_port'] == 993
context['env_port'] = os.environ['imap_port']
context['env_matches'] = os.environ['email_password'] == context['email_password']
context['whitelist'] = context['sender_whitelist']
context['slug'] = context['client_slug']
context['login'] = context['email_user']
context['copied'] = context['email_password']
context['nested'] = {'deep': [{'url': 'imap://' + context['email_user'] + ':' + context['email_password']
                               + '@' + context['imap_host'] + ':' + str(context['imap_port'])}]}
context['dsn'] = 'postgres://app:' + quote(context['db_password'], safe='') + '@db/app'
print('password is', context['email_password'])
print(json.dumps(context))
print('db password', context['db_password'], file=sys.stderr)
"""
NODE_FAILS_WITH_SECRET = "raise ValueError('login refused for ' + context['email_password'])"


async def test_node_sees_credentials_typed_and_nothing_shown_holds_a_secret(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    pool: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    await nova_client(redis, pool, settings)
    wf = await create_workflow(redis, settings, pool, linear(NODE_READS_CREDENTIALS, NODE_FAILS_WITH_SECRET))
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf, {"invoice": 7})
        done = (await wait_terminal(redis, settings, [task.task_id]))[task.task_id]
        await wait_projected(pool, [task.execution_id], {"failed"})
    assert done.type == EventType.FAILED
    final = done.data["final_context"]
    # Typed as stored, in the context and (as text) in the environment; settings and the slug as they are.
    assert final["port_is_int"] is True and final["env_port"] == "993" and final["env_matches"] is True
    assert final["whitelist"] is None and final["slug"] == "acme" and final["login"] == "invoices@acme.test"
    # Secrets copied, nested, inside longer strings or URL-quoted are masked; settings beside them are not.
    assert final["copied"] == MASK
    assert final["nested"] == {"deep": [{"url": f"imap://invoices@acme.test:{MASK}@imap.acme.test:993"}]}
    assert final["dsn"] == f"postgres://app:{MASK}@db/app"
    # The injected keys are gone from every context shown.
    injected = {"email_user", "email_password", "imap_host", "imap_port", "smtp_port", "sender_whitelist"}
    injected |= {"db_password", "client_slug"}
    assert not injected & set(final)
    node_runs = await pool.fetch("SELECT * FROM node_runs WHERE execution_id = $1 ORDER BY step", task.execution_id)
    for row in node_runs:
        for column in ("input_context", "output_context"):
            assert not injected & set(row[column] or {}), (row["node_id"], column)
    a1, a2 = node_runs[1], node_runs[2]
    assert f"password is {MASK}\n" in a1["stdout"] and a1["stderr"] == f"db password {MASK}\n"
    printed = json.loads(a1["stdout"].splitlines()[1])
    assert printed["email_password"] == MASK and printed["imap_host"] == "imap.acme.test"
    # The failing node's message and traceback carry the mask, not the secret.
    assert done.data["error"]["message"] == f"login refused for {MASK}" and MASK in done.data["error"]["traceback"]
    assert a2["error"]["message"] == f"login refused for {MASK}"
    seen = await everything_shown(redis, settings, pool, api, task.task_id, task.execution_id)
    seen.append(caplog.text)
    assert leaks(seen) == []
    assert any("invoices@acme.test" in text for text in seen)


class CrashAfterNode:
    """The real local sandbox, but the first run of one node is lost after its code ran, as in a
    crash: the error carries the node's output, which printed a secret."""

    def __init__(self, inner: SandboxProvider, node_id: str) -> None:
        self.inner = inner
        self.node_id = node_id
        self.crashed = False

    async def start(self) -> None:
        await self.inner.start()

    async def open(self, spec: SandboxSpec) -> Sandbox:
        return _Crashing(await self.inner.open(spec), self)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Crashing:
    def __init__(self, inner: Sandbox, provider: CrashAfterNode) -> None:
        self.inner = inner
        self.provider = provider

    async def run_action(self, node_id: str, code: str, context: dict[str, Any], timeout: float) -> NodeResult:
        result = await self.inner.run_action(node_id, code, context, timeout)
        if node_id == self.provider.node_id and not self.provider.crashed:
            self.provider.crashed = True
            raise SandboxInfraError(f"sandbox lost after node {node_id} printed {result.stdout!r}")
        return result

    async def evaluate(self, node_id: str, expression: str, context: dict[str, Any], timeout: float) -> NodeResult:
        return await self.inner.evaluate(node_id, expression, context, timeout)

    async def close(self) -> None:
        await self.inner.close()


COPY_SECRET = "context['dsn'] = 'postgres://app:' + context['db_password'] + '@db/app'"
USE_COPY = """
import os
context['dsn_intact'] = context['dsn'] == 'postgres://app:' + os.environ['db_password'] + '@db/app'
print('connecting to', context['dsn'])
"""


async def test_resume_after_a_crash_keeps_the_true_copy_and_shows_none(
    api: httpx.AsyncClient,
    redis: Redis,
    settings: Settings,
    pool: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    await nova_client(redis, pool, settings)
    wf = await create_workflow(redis, settings, pool, linear(COPY_SECRET, USE_COPY))
    crashing = CrashAfterNode(LocalSandboxProvider(settings), "a2")
    async with in_process_worker(settings, providers={"local": crashing}):
        task = await enqueue(redis, settings, wf)
        done = (await wait_terminal(redis, settings, [task.task_id]))[task.task_id]
        await wait_projected(pool, [task.execution_id], {"completed"})
    assert crashing.crashed and done.type == EventType.SUCCEEDED, done.data
    # The resumed a2 read the copy a1 made before the crash, with its true value.
    assert done.data["final_context"] == {"dsn": f"postgres://app:{MASK}@db/app", "dsn_intact": True}
    [retry] = await wait_for_events(redis, settings, lambda e: e.task_id == task.task_id and e.type == EventType.RETRY)
    assert (
        retry.data["error"]["message"]
        == f"sandbox lost after node a2 printed 'connecting to postgres://app:{MASK}@db/app\\n'"
    )
    starts = await wait_for_events(
        redis, settings, lambda e: e.task_id == task.task_id and e.type == EventType.STARTED, 2
    )
    assert [s.data["resumed_from_step"] for s in starts] == [0, 2]
    # The checkpoint keeps true values, encrypted at rest; reading it back decrypts.
    stored = await redis.hget(Keys.from_settings(settings).task(task.task_id), TaskField.CHECKPOINT)
    assert stored.startswith(SEALED_CHECKPOINT) and "postgres" not in stored
    checkpoint = read_checkpoint(stored, Vault(SECRETS_KEY))
    assert checkpoint is not None and checkpoint.context["dsn"] == f"postgres://app:{DB_PASSWORD}@db/app"
    seen = await everything_shown(redis, settings, pool, api, task.task_id, task.execution_id)
    seen.append(caplog.text)
    assert leaks(seen) == []
    assert any(f"connecting to postgres://app:{MASK}@db/app" in text for text in seen)


async def test_a_sealed_checkpoint_without_its_key_is_retried_then_dead_lettered(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("context['ran'] = True"))
    task = await enqueue(redis, settings, wf)
    other = Vault(Vault.new_key())
    checkpoint = Checkpoint(step=2, next_node="end", context={"x": 1}, visits={"start": 1, "a1": 1})
    sealed = SEALED_CHECKPOINT + other.encrypt(dumps(checkpoint.as_json()))
    await redis.hset(Keys.from_settings(settings).task(task.task_id), TaskField.CHECKPOINT, sealed)
    async with in_process_worker(settings, max_retries=0):
        done = (await wait_terminal(redis, settings, [task.task_id]))[task.task_id]
    assert done.type == EventType.DEAD
    assert "does not decrypt with this worker's NOVA_SECRETS_KEY" in done.data["error"]["message"]
    # Never run from scratch instead: the node's work may have happened already.
    types = [f["type"] for _, f in await redis.xrange(settings.results_stream) if f["task_id"] == task.task_id]
    assert EventType.NODE_STARTED not in types and EventType.STARTED not in types
