"""The local sandbox's isolation and limits: each breach fails only its node, with a clear message."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from consumer.sandbox import isolation, local
from consumer.sandbox.base import NodeError, SandboxSpec
from consumer.sandbox.local import LocalSandbox, LocalSandboxProvider
from shared.settings import Settings
from tests.support import process_alive


@pytest.fixture
async def provider() -> AsyncIterator[LocalSandboxProvider]:
    p = LocalSandboxProvider(Settings(sandbox_pool_size=1), memory_limit_mb=256, max_output_bytes=64 * 1024)
    await p.start()
    yield p
    await p.aclose()


async def sandbox(provider: LocalSandboxProvider, execution_id: int = 1, **secrets: str) -> LocalSandbox:
    return await provider.open(SandboxSpec(execution_id=execution_id, client="acme", secrets=secrets))


def in_workdir(sb: LocalSandbox, name: str) -> Path:
    """A file of the sandbox's work folder as the worker sees it: on the host, or (the fork server's and
    bwrap's sandboxes make theirs on their own /tmp) through the root of a process in its mount namespace:
    the fork server's init (sb.pid), or bwrap's child (sb.pid is bwrap itself, in the host's)."""
    if sb.host_folder is not None:
        return sb.host_folder / name
    own = os.readlink("/proc/self/ns/mnt")
    inside = sb.pid
    for pid in [sb.pid, *(sb.cgroup.pids() if sb.cgroup is not None else [])]:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/ns/mnt") != own:
                inside = pid
                break
    return Path(f"/proc/{inside}/root") / sb.workdir.relative_to("/") / name


async def test_actions_decisions_and_persistent_globals(provider: LocalSandboxProvider) -> None:
    sb = await sandbox(provider)
    try:
        first = await sb.run_action(
            "a", "import json\ncounter = 1\ncontext['n'] = context['n'] + 1\nprint('hi')", {"n": 1}, 5
        )
        assert first.context == {"n": 2} and first.stdout == "hi\n"
        second = await sb.run_action("b", "counter += 1\ncontext['s'] = json.dumps({'c': counter})", first.context, 5)
        assert second.context == {"n": 2, "s": '{"c": 2}'}
        decision = await sb.evaluate("d", "context['n'] > 1 and counter == 2", second.context, 5)
        assert decision.decision is True and decision.context == second.context
        rebound = await sb.run_action("c", "context = {'fresh': True}", {"old": 1}, 5)
        assert rebound.context == {"fresh": True}
    finally:
        await sb.close()


async def test_exception_names_node_line_and_type(provider: LocalSandboxProvider) -> None:
    sb = await sandbox(provider)
    try:
        with pytest.raises(NodeError) as info:
            await sb.run_action("parse", "x = 1\nprint('before')\nraise KeyError('vendor')", {}, 5)
        err = info.value
        assert (err.type, err.message, err.reason) == ("KeyError", "'vendor'", "exception")
        assert 'File "<node parse>", line 3' in err.traceback and "raise KeyError('vendor')" in err.traceback
        assert "runner.py" not in err.traceback and err.stdout == "before\n"
        # The sandbox is still usable after a failing node.
        assert (await sb.run_action("next", "context['ok'] = 1", {}, 5)).context == {"ok": 1}
    finally:
        await sb.close()


async def test_infinite_loop_times_out_and_kills_the_process(provider: LocalSandboxProvider) -> None:
    sb = await sandbox(provider)
    with pytest.raises(NodeError) as info:
        await sb.run_action("spin", "while True: pass", {}, 0.5)
    assert info.value.reason == "timeout" and "spin" in info.value.message and "0.5s" in info.value.message
    assert not process_alive(sb.pid) and not in_workdir(sb, "").exists()


async def test_memory_bomb_fails_the_node_only(provider: LocalSandboxProvider) -> None:
    sb = await sandbox(provider)
    try:
        with pytest.raises(NodeError) as info:
            await sb.run_action("bomb", "blocks = []\nwhile True: blocks.append(bytearray(50 << 20))", {}, 10)
        assert info.value.reason == "limit:memory" and "memory limit" in info.value.message
    finally:
        await sb.close()
    other = await sandbox(provider, 2)
    try:
        assert (await other.run_action("fine", "context['x'] = 1", {}, 5)).context == {"x": 1}
    finally:
        await other.close()


async def test_output_flood_is_capped_with_a_clear_error(provider: LocalSandboxProvider) -> None:
    sb = await sandbox(provider)
    try:
        with pytest.raises(NodeError) as info:
            await sb.run_action("flood", "chunk = 'x' * (1 << 20)\nfor _ in range(100): print(chunk)", {}, 10)
        assert info.value.reason == "limit:output" and "65536 bytes" in info.value.message
    finally:
        await sb.close()


async def test_unserialisable_context_names_the_key(provider: LocalSandboxProvider) -> None:
    sb = await sandbox(provider)
    try:
        with pytest.raises(NodeError) as info:
            await sb.run_action(
                "dates", "import datetime\ncontext['invoice'] = {'when': datetime.date(2026, 1, 1)}", {}, 5
            )
        assert info.value.reason == "serialization"
        assert info.value.message == "context['invoice']['when'] is not JSON-serialisable (date)"
    finally:
        await sb.close()


async def test_a_context_holding_a_lone_surrogate_names_the_key(provider: LocalSandboxProvider) -> None:
    # Text decoded with surrogateescape (bytes that are not UTF-8, as in a mail's attachment) holds lone
    # surrogates, which JSON cannot carry: the node failed as "a reply that is not JSON", with a parser's
    # message about UTF-8 and no word of which value. A string of emoji (surrogate pairs once escaped) is fine.
    sb = await sandbox(provider)
    try:
        assert (await sb.run_action("emoji", "context['x'] = '\U0001f600 ok'", {}, 5)).context == {"x": "\U0001f600 ok"}
        with pytest.raises(NodeError) as info:
            code = "context['mail'] = {'body': [b'caf\\xe9'.decode('utf-8', 'surrogateescape')]}"
            await sb.run_action("mail", code, {}, 5)
        assert info.value.reason == "serialization"
        assert info.value.message == (
            "context['mail']['body'][0] holds a lone surrogate (U+DCE9), which JSON cannot carry"
        )
    finally:
        await sb.close()


def test_only_a_lone_surrogate_in_a_contexts_text_makes_the_runner_walk_the_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The walk for a lone surrogate is Python over the whole context: one emoji (a pair once escaped) in
    # a big context made its reply several times slower when any escaped surrogate started it.
    import io

    from consumer.sandbox import runner as runner_module

    walked: list[object] = []
    real = runner_module._first_lone_surrogate

    def counted(value: object, path: str) -> str | None:
        walked.append(value)
        return real(value, path)

    monkeypatch.setattr(runner_module, "_first_lone_surrogate", counted)
    r = runner_module.Runner(io.BytesIO(), io.BytesIO(), {})  # type: ignore[arg-type]
    for context in ({"note": "ok \U0001f600", "k\U0001f600": ["\U00010348"]}, {"rows": list(range(1000))}):
        r.globals["context"] = context
        assert r._context_reply("n")["ok"]
    assert walked == []
    r.globals["context"] = {"rows": [1, "caf\udce9"]}
    reply = r._context_reply("n")
    assert not reply["ok"] and reply["error"]["message"].startswith("context['rows'][1] holds a lone surrogate")
    assert walked and walked[0] is r.globals["context"]


async def test_environment_is_scrubbed_and_secrets_are_private(
    provider: LocalSandboxProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOVA_WORKER_ONLY_SECRET", "do-not-leak")
    mine = await sandbox(provider, 1, IMAP_PASSWORD="p1")
    theirs = await sandbox(provider, 2)
    try:
        code = "import os\ncontext['env'] = dict(os.environ)"
        env = (await mine.run_action("env", code, {}, 5)).context["env"]
        assert env["IMAP_PASSWORD"] == "p1" and "NOVA_WORKER_ONLY_SECRET" not in env
        assert not any(k in env for k in ("REDIS_URL", "DATABASE_URL", "E2B_API_KEY"))
        other_env = (await theirs.run_action("env", code, {}, 5)).context["env"]
        assert "IMAP_PASSWORD" not in other_env
    finally:
        await mine.close()
        await theirs.close()


async def test_close_kills_the_process_and_removes_its_directory(provider: LocalSandboxProvider) -> None:
    sb = await sandbox(provider)
    await sb.run_action("w", "open('scratch.txt', 'w').write('x')", {}, 5)
    assert in_workdir(sb, "scratch.txt").read_text() == "x"
    await sb.close()
    await sb.close()  # idempotent
    assert not process_alive(sb.pid) and not in_workdir(sb, "scratch.txt").exists() and not in_workdir(sb, "").exists()


async def test_pool_never_hands_out_a_process_twice(provider: LocalSandboxProvider) -> None:
    seen = set()
    for i in range(4):
        sb = await sandbox(provider, i)
        assert sb.pid not in seen
        seen.add(sb.pid)
        await sb.run_action("n", "assert 'leftover' not in globals()\nleftover = 1", {}, 5)
        await sb.close()


needs_uids = pytest.mark.skipif(os.geteuid() != 0, reason="separate sandbox uids need the worker to run as root")


@needs_uids
async def test_one_execution_cannot_read_anothers_directory(provider: LocalSandboxProvider) -> None:
    assert provider.separate_uids
    victim = await sandbox(provider, 1)
    thief = await sandbox(provider, 2)
    try:
        await victim.run_action("w", "open('invoice.txt', 'w').write('secret')", {}, 5)
        assert in_workdir(victim, "invoice.txt").read_text() == "secret"
        listing = f"import os\ncontext['x'] = os.listdir({str(victim.workdir)!r})"
        if victim.host_folder is None:
            # Each sandbox's folder is on its own /tmp: at the victim's path the thief finds its own, empty.
            assert (await thief.run_action("ls", listing, {}, 5)).context == {"x": []}
            return
        # Folders on the host: the victim's 0700 mode turns the thief away.
        with pytest.raises(NodeError) as info:
            await thief.run_action("r", f"context['x'] = open({str(victim.workdir / 'invoice.txt')!r}).read()", {}, 5)
        assert info.value.type == "PermissionError"
        with pytest.raises(NodeError) as info:
            await thief.run_action("ls", listing, {}, 5)
        assert info.value.type == "PermissionError"
    finally:
        await victim.close()
        await thief.close()


@needs_uids
async def test_fork_bomb_is_contained_and_cleaned_up(provider: LocalSandboxProvider) -> None:
    sb = await sandbox(provider)
    with pytest.raises(NodeError) as info:
        await sb.run_action(
            "forks", "import os\nwhile True:\n    if os.fork() == 0:\n        import time; time.sleep(60)", {}, 10
        )
    assert info.value.type == "BlockingIOError"
    # sb.pid is bwrap's (root) when namespaces are in use; the sandbox's own uid is its lease's.
    assert sb.lease is not None
    uid = str(sb.lease.uid)
    await sb.close()
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _uid_of(p) == uid]
    assert leftovers == []


def _uid_of(proc: Path) -> str | None:
    try:
        return (proc / "status").read_text().split("Uid:")[1].split()[0]
    except (OSError, IndexError):
        return None


@needs_uids
async def test_concurrent_sandboxes_never_share_a_uid_even_across_workers() -> None:
    # Two providers stand for two worker processes on one machine (the uid lease is an flock).
    providers = [LocalSandboxProvider(Settings(sandbox_pool_size=0)) for _ in range(2)]
    boxes = [await p.open(SandboxSpec(execution_id=i, client="c")) for i in range(6) for p in providers]
    try:
        uids = [b.lease.uid for b in boxes if b.lease]
        assert len(uids) == 12 and len(set(uids)) == 12
    finally:
        for b in boxes:
            await b.close()
        for p in providers:
            await p.aclose()


def _locked_elsewhere(uid: int) -> bool:
    """Whether some open lease holds `uid`'s lock (an flock: this process's other descriptions count)."""
    fd = os.open(local._UID_LOCKS / str(uid), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


@needs_uids
async def test_a_released_uid_stays_the_workers_for_its_next_sandbox_until_it_closes() -> None:
    # A uid taken afresh makes its lock file, the worker's largest cost per sandbox: the uids its sandboxes
    # release (nothing of them left) are kept, still locked against other workers, for its next ones.
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0))
    try:
        first = await provider.open(SandboxSpec(execution_id=1, client="acme"))
        assert first.lease is not None
        uid = first.lease.uid
        await first.run_action(
            "w", "open('invoice.txt', 'w').write('secret')\nopen('/dev/shm/s', 'w').write('s')", {}, 5
        )
        await first.close()
        assert _locked_elsewhere(uid)
        second = await provider.open(SandboxSpec(execution_id=2, client="globex"))
        assert second.lease is not None and second.lease.uid == uid
        # Nothing of the first sandbox is left to the next one of its uid.
        look = "import os\ncontext['seen'] = os.listdir('.') + os.listdir('/dev/shm')"
        assert (await second.run_action("ls", look, {}, 5)).context == {"seen": []}
        await second.close()
    finally:
        await provider.aclose()
    # The worker's end lets it go for every worker.
    assert not _locked_elsewhere(uid)


def test_a_uid_released_twice_is_kept_once() -> None:
    # Kept twice, it would go to two live sandboxes at once.
    kept = local.KeptUids(keep=True)
    lease = kept.take()
    lease.release()
    lease.release()
    assert kept.take() is lease
    other = kept.take()
    try:
        assert other is not lease and other.uid != lease.uid
    finally:
        kept.close()
        for held in (lease, other):
            held.release()


@needs_uids
async def test_with_a_writable_folder_the_next_sandbox_never_gets_the_uid_of_the_files_left_there(
    shared_dir: Path,
) -> None:
    # Files of a sandbox's uid outlive it in a writable folder: a uid kept for the worker's next sandbox
    # (another client's) would open them, mode 0600 or not. Each sandbox then takes a fresh uid.
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_writable=str(shared_dir)))
    secret = shared_dir / "acme-secret"
    try:
        first = await provider.open(SandboxSpec(execution_id=1, client="acme"))
        write = f"import os\nos.close(os.open({str(secret)!r}, os.O_CREAT | os.O_WRONLY, 0o600))\n"
        await first.run_action("w", write + f"open({str(secret)!r}, 'w').write('card 4111')", {}, 5)
        assert first.lease is not None
        uid = first.lease.uid
        await first.close()
        assert secret.stat().st_uid == uid and secret.stat().st_mode & 0o777 == 0o600
        second = await provider.open(SandboxSpec(execution_id=2, client="globex"))
        assert second.lease is not None and second.lease.uid != uid
        with pytest.raises(NodeError) as info:
            await second.run_action("r", f"context['x'] = open({str(secret)!r}).read()", {}, 5)
        assert info.value.type == "PermissionError"
        await second.close()
    finally:
        await provider.aclose()


# Node code is hostile: it can reach the runner object in its own interpreter and write to the
# protocol itself. The worker checks every reply frame where node code cannot reach.
FIND_RUNNER = "import gc\nrunner = next(o for o in gc.get_objects() if type(o).__name__ == 'Runner')\n"


async def test_a_forged_frame_header_fails_the_node_without_reading_it(provider: LocalSandboxProvider) -> None:
    sb = await sandbox(provider)
    code = FIND_RUNNER + "runner.proto_out.write((300 << 20).to_bytes(4, 'big'))\nrunner.proto_out.flush()"
    with pytest.raises(NodeError) as info:
        await sb.run_action("forger", code, {}, 10)
    assert info.value.reason == "limit:output" and "314572800 bytes" in info.value.message
    assert sb.dead and not process_alive(sb.pid)


async def test_a_reply_that_is_not_json_fails_the_node(provider: LocalSandboxProvider) -> None:
    sb = await sandbox(provider)
    code = FIND_RUNNER + "runner.proto_out.write((4).to_bytes(4, 'big') + b'\\xff{]x')\nrunner.proto_out.flush()"
    with pytest.raises(NodeError) as info:
        await sb.run_action("garbler", code, {}, 10)
    assert info.value.reason == "output" and "not JSON" in info.value.message
    assert sb.dead


async def test_a_context_cap_lifted_inside_the_sandbox_still_holds() -> None:
    p = LocalSandboxProvider(Settings(sandbox_pool_size=0), max_context_bytes=256 * 1024)
    await p.start()
    try:
        sb = await sandbox(p)
        code = FIND_RUNNER + "runner.context_cap = 1 << 40\ncontext['blob'] = 'x' * (2 << 20)"
        with pytest.raises(NodeError) as info:
            await sb.run_action("lifter", code, {}, 10)
        assert info.value.reason in ("limit:context", "limit:output"), info.value
        assert sb.dead
    finally:
        await p.aclose()


def test_workers_of_two_releases_on_one_host_each_run_their_own_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The sandboxes' base folder is the machine's: a worker of another release (another runner.py)
    # must not replace the copy this one's sandboxes run.
    ours = local._sandbox_runner()
    other = tmp_path / "runner.py"
    other.write_text(local.RUNNER.read_text() + "\n# another release\n")
    monkeypatch.setattr(local, "RUNNER", other)
    theirs = local._sandbox_runner()
    assert theirs != ours and theirs.read_bytes() == other.read_bytes()
    monkeypatch.undo()
    assert local._sandbox_runner() == ours and ours.read_bytes() == local.RUNNER.read_bytes()


def test_a_cgroup_name_left_by_an_earlier_process_with_this_pid_is_passed_over() -> None:
    # Cgroups are named pidns-pid-number; a worker killed with groups left (its spares) leaves names that a
    # later process with the same pid would make next.
    root, why = isolation.CgroupRoot.detect()
    if root is None:
        pytest.skip(f"no cgroups here ({why})")
    following = next(isolation._counter) + 1
    ns = os.stat("/proc/self/ns/pid").st_ino
    leftovers = [parent / f"{ns}-{os.getpid()}-{following + i}" for parent in root.parents.values() for i in range(3)]
    for folder in leftovers:
        folder.mkdir()
    group = None
    try:
        group = root.create(64 << 20, 16, 1.0)
        assert all(folder.exists() for folder in leftovers)
        assert all(folder.name == f"{ns}-{os.getpid()}-{following + 3}" for folder in group.folders.values())
    finally:
        if group is not None:
            group.remove()
        for folder in leftovers:
            folder.rmdir()


def test_the_egress_allow_list_is_checked_at_start() -> None:
    assert Settings(sandbox_egress_allow=" 10.88.0.2/32, fd12:3456::/48 ,").egress_allow_list == [
        "10.88.0.2/32",
        "fd12:3456::/48",
    ]
    # A typo is a clear error at start-up, not an allow-list that quietly lets nothing (or everything) through.
    for bad in ("10.88.0.300/32", "10.0.0.0/33", "internal-api"):
        with pytest.raises(ValidationError, match="NOVA_SANDBOX_EGRESS_ALLOW"):
            Settings(sandbox_egress_allow=bad)


def test_a_killed_workers_cgroups_are_swept_at_the_next_start() -> None:
    # Groups are named <pid namespace>-<pid>-<number>. A worker killed with groups left (its spares, or a
    # sandbox still in one) leaves them; the next worker of the host removes those whose maker is gone,
    # killing what is left in them, and leaves alone those of live workers and of other pid namespaces
    # (another container sharing the hierarchy, whose pids mean nothing here).
    root, why = isolation.CgroupRoot.detect()
    if root is None:
        pytest.skip(f"no cgroups here ({why})")
    gone = subprocess.Popen(["true"])
    gone.wait()
    ns = os.stat("/proc/self/ns/pid").st_ino
    names = {
        "dead": f"{ns}-{gone.pid}-0",
        "dead_busy": f"{ns}-{gone.pid}-1",
        "alive": f"{ns}-{os.getpid()}-999999",
        "other_ns": f"{ns + 1}-{gone.pid}-0",
    }
    folders = {key: [parent / name for parent in root.parents.values()] for key, name in names.items()}
    for group in folders.values():
        for folder in group:
            folder.mkdir()
    orphan = subprocess.Popen(["sleep", "60"])
    try:
        for folder in folders["dead_busy"]:
            (folder / "cgroup.procs").write_text(str(orphan.pid))
        again, _ = isolation.CgroupRoot.detect()
        assert again is not None
        assert orphan.wait(timeout=10) == -9
        assert not any(folder.exists() for key in ("dead", "dead_busy") for folder in folders[key])
        assert all(folder.exists() for key in ("alive", "other_ns") for folder in folders[key])
    finally:
        orphan.kill()
        orphan.wait()
        for group in folders.values():
            for folder in group:
                if folder.exists():
                    folder.rmdir()
