"""Node code as an attacker writes it, against the local sandbox: each attack of issue 13 must fail.

These need root (own uids, namespaces, cgroups); elsewhere they skip with the reason, and the worker
states at start-up which guarantees are missing (test_isolation_statement_* run everywhere).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from redis.asyncio import Redis

from cli.dev import sandbox_insecure_env
from consumer.sandbox.base import NodeError, SandboxSpec
from consumer.sandbox.isolation import Isolation, nameservers
from consumer.sandbox.local import LocalSandbox, LocalSandboxProvider
from consumer.sandbox.netns import TABLE, find_nft, host_ruleset
from shared.settings import Settings
from tests.support import create_workflow, enqueue, in_process_worker, linear, wait_terminal


def _full_isolation() -> str | None:
    if os.geteuid() != 0:
        return "the sandbox's own uids, namespaces and cgroups need the worker to run as root"
    probe = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="none"))
    if not probe.isolation.complete:
        missing = "; ".join(what for holds, what in probe.isolation.statements() if not holds)
        return f"isolation incomplete on this machine: {missing}"
    return None


_WHY_NOT = _full_isolation()
isolated = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")


@pytest.fixture(autouse=True, params=["fork", "bwrap"])
def launch(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every attack runs against both ways of starting a sandbox: the fork server and bubblewrap."""
    monkeypatch.setenv("NOVA_SANDBOX_LAUNCH", request.param)
    return str(request.param)


@isolated
def test_each_attack_meets_the_launcher_it_names(launch: str) -> None:
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0))
    assert provider.launcher == {"fork": "fork server", "bwrap": "bubblewrap"}[launch]
    assert provider.statement()[0].startswith(f"local sandbox: started by {'the ' if launch == 'fork' else ''}")


@pytest.fixture
async def provider() -> AsyncIterator[LocalSandboxProvider]:
    p = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="none"), memory_limit_mb=256)
    yield p
    await p.aclose()


async def open_box(provider: LocalSandboxProvider, execution_id: int, client: str = "acme") -> LocalSandbox:
    return await provider.open(SandboxSpec(execution_id=execution_id, client=client))


def processes_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        if int(status.split("Uid:")[1].split()[0]) == uid and "State:\tZ" not in status:
            found.append(int(entry.name))
    return found


# fork, setsid, fork again: the grandchild is in no process group of the sandbox's.
ESCAPE = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(300)
    os._exit(0)
os.wait()
"""


@isolated
async def test_a_daemonised_grandchild_dies_with_its_sandbox(provider: LocalSandboxProvider) -> None:
    sb = await open_box(provider, 1)
    await sb.run_action("escape", ESCAPE, {}, 10)
    assert sb.lease is not None
    uid = sb.lease.uid
    assert len(processes_of(uid)) == 2  # the runner and the escaped grandchild, before the end
    await sb.close()
    assert processes_of(uid) == []
    assert sb.lease is None  # returned to the pool, only now that nothing of it is left


@isolated
async def test_one_clients_tmp_and_shm_files_are_invisible_to_another(provider: LocalSandboxProvider) -> None:
    victim = await open_box(provider, 1, "acme")
    thief = await open_box(provider, 2, "globex")
    try:
        write = "open('/tmp/token', 'w').write('acme-secret')\nopen('/dev/shm/token', 'w').write('acme-secret')"
        await victim.run_action("w", write, {}, 5)
        look = "import os\ncontext['tmp'] = os.listdir('/tmp')\ncontext['shm'] = os.listdir('/dev/shm')"
        seen = (await thief.run_action("r", look, {}, 5)).context
        assert "token" not in seen["tmp"] and seen["shm"] == []
        assert Path("/tmp/token").exists() is False and Path("/dev/shm/token").exists() is False
        # The rest of the system is read-only: no file left for the next sandbox anywhere else.
        with pytest.raises(NodeError) as info:
            await thief.run_action("plant", "open('/var/tmp/planted', 'w').write('x')", {}, 5)
        assert info.value.type == "OSError" and "Read-only" in info.value.message
        # Its own /proc: the runner is process 1 or 2, and no host process is visible.
        pids = (await thief.run_action("ps", "import os\ncontext['p'] = [p for p in os.listdir('/proc') "
                                       "if p.isdigit()]", {}, 5)).context["p"]  # fmt: skip
        assert len(pids) <= 3
    finally:
        await victim.close()
        await thief.close()


def _probe(host: str, port: int) -> str:
    return (
        "import socket\n"
        "try:\n"
        f"    socket.create_connection(({host!r}, {port}), timeout=2).close()\n"
        "    context['reached'] = True\n"
        "except OSError as exc:\n"
        "    context['reached'] = False\n"
        "    context['error'] = type(exc).__name__\n"
    )


@isolated
async def test_network_none_cannot_reach_the_suites_redis_and_postgresql(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    # The worker reaches both (it runs the execution through them); node code, through the whole
    # pipeline, reaches neither.
    targets = [urlsplit(settings.redis_url), urlsplit(settings.database_url)]
    actions = [
        _probe(t.hostname or "127.0.0.1", t.port or 0).replace("'reached'", f"'reached{i}'")
        for i, t in enumerate(targets)
    ]
    wf = await create_workflow(redis, settings, pool, linear(*actions))
    task = await enqueue(redis, settings, wf)
    async with in_process_worker(settings, sandbox_network="none"):
        events = await wait_terminal(redis, settings, [task.task_id])
    final = events[task.task_id].data["final_context"]
    assert final["reached0"] is False and final["reached1"] is False, final


@isolated
async def test_four_children_over_the_memory_limit_together_are_killed(provider: LocalSandboxProvider) -> None:
    # Each child stays under the per-process limit (256 MiB); together they need 480 MiB.
    code = """
import os, time
children = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        block = bytearray(120 << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(1)  # long enough for all four to hold their memory at once
        os._exit(0)
    children.append(pid)
context['statuses'] = [os.waitpid(pid, 0)[1] for pid in children]
"""
    sb = await open_box(provider, 1)
    try:
        try:
            result = await sb.run_action("hog", code, {}, 20)
        except NodeError as exc:
            # The kernel chose the runner itself: the node fails with the memory limit named.
            assert exc.reason == "limit:memory", exc
            return
        killed = [s for s in result.context["statuses"] if os.WIFSIGNALED(s) and os.WTERMSIG(s) == 9]
        assert killed, result.context
    finally:
        await sb.close()


@dataclass
class HostServices:
    stream: str  # answers "host-secret" to whoever connects
    datagram: str  # keeps what it is sent
    received: list[bytes]


@pytest.fixture
def host_services() -> Iterator[HostServices]:
    """Services of the host on Unix sockets outside /tmp, open to every uid: a stream one (as PostgreSQL's
    /var/run/postgresql/.s.PGSQL.5432 with trust auth, or a container runtime's socket) and a datagram
    one (as /dev/log)."""
    folder = Path(tempfile.mkdtemp(prefix="nova-host-service-", dir="/run"))
    folder.chmod(0o755)
    services = HostServices(str(folder / "service.sock"), str(folder / "log.sock"), [])
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(services.stream)
    server.listen(8)
    server.settimeout(0.1)
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log.bind(services.datagram)
    log.settimeout(0.1)
    for path in (services.stream, services.datagram):
        os.chmod(path, 0o777)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = server.accept()
                with conn:
                    conn.sendall(b"host-secret")
            with contextlib.suppress(TimeoutError):
                services.received.append(log.recv(100))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield services
    stop.set()
    thread.join(2)
    server.close()
    log.close()
    shutil.rmtree(folder)


@isolated
@pytest.mark.parametrize("network", ["none", "egress"])
async def test_node_code_cannot_reach_a_host_service_on_its_unix_socket(
    host_services: HostServices, network: str
) -> None:
    """A Unix socket is reached through the file system, which every sandbox sees (read-only, and a
    read-only mount does not stop a connect): node code talked to the host's services, with network
    `none` as with `egress`. A Unix socket of its own is refused, and a datagram pair cannot be pointed
    at one; an unnamed stream pair (asyncio's, multiprocessing's pipes) still works."""
    code = (
        "import socket\n"
        "got = []\n"
        "try:\n"
        "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        f"    s.connect({host_services.stream!r})\n"
        "    got.append(s.recv(100).decode())\n"
        "except OSError as exc:\n"
        "    got.append(type(exc).__name__)\n"
        "for kind in (socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):\n"
        "    try:\n"
        "        s = socket.socketpair(socket.AF_UNIX, kind)[0]\n"
        f"        s.sendto(b'forged log line', {host_services.datagram!r})\n"
        f"        s.connect({host_services.datagram!r})\n"
        "        s.send(b'forged log line')\n"
        "        got.append('sent')\n"
        "    except OSError as exc:\n"
        "        got.append(type(exc).__name__)\n"
        # The kernel reads the family as an int: a filter comparing all 64 bits of it let through a family
        # with its upper bits set (raw system calls: socket is 41, socketpair 53 on x86-64).
        "import ctypes, platform\n"
        "if platform.machine() == 'x86_64':\n"
        "    libc = ctypes.CDLL(None, use_errno=True)\n"
        "    libc.syscall.restype = ctypes.c_long\n"
        "    family = ctypes.c_long((1 << 32) | socket.AF_UNIX)\n"
        "    fd = libc.syscall(ctypes.c_long(41), family, ctypes.c_long(socket.SOCK_STREAM), ctypes.c_long(0))\n"
        "    if fd >= 0:\n"
        "        s = socket.socket(fileno=fd)\n"
        f"        s.connect({host_services.stream!r})\n"
        "        got.append(s.recv(100).decode())\n"
        "    fds = (ctypes.c_int * 2)()\n"
        "    kind = ctypes.c_long(socket.SOCK_DGRAM)\n"
        "    made = libc.syscall(ctypes.c_long(53), family, kind, ctypes.c_long(0), fds) == 0\n"
        "    got.append('pair made' if made else 'pair refused')\n"
        "a, b = socket.socketpair()\n"
        "a.sendall(b'ok')\n"
        "context['got'], context['pair'] = got, b.recv(2).decode()\n"
    )
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network=network), memory_limit_mb=256)
    try:
        sb = await open_box(provider, 1)
        try:
            result = (await sb.run_action("probe", code, {}, 10)).context
        finally:
            await sb.close()
    finally:
        await provider.aclose()
    await asyncio.sleep(0.3)  # a datagram sent is received by then
    assert result["got"] == ["PermissionError"] * 3 + ["pair refused"] and host_services.received == [], result
    assert result["pair"] == "ok"


# A machine without root: no own uids, no cgroups, egress unfiltered (as `Isolation` reports it there).
UNPRIVILEGED = Isolation(
    root=False,
    separate_uids=False,
    namespaces=True,
    namespaces_why="bubblewrap",
    cgroups=None,
    cgroups_why="not root (cgroups need it here)",
    network="egress",
    egress_why="the filter matches the sandboxes' own uids, which need root",
)


def test_isolation_statement_names_what_is_missing() -> None:
    lines = dict((what, holds) for holds, what in UNPRIVILEGED.statements())
    assert lines["sandboxes share the worker's uid"] is False
    assert any("no cgroups" in what and not holds for what, holds in lines.items())
    assert any("egress unfiltered" in what and not holds for what, holds in lines.items())
    assert UNPRIVILEGED.complete is False


def incomplete(settings: Settings) -> LocalSandboxProvider:
    provider = LocalSandboxProvider(settings)
    provider.isolation = UNPRIVILEGED
    return provider


async def test_an_incompletely_isolated_worker_refuses_a_second_client() -> None:
    provider = incomplete(Settings(sandbox_pool_size=0))
    try:
        first = await open_box(provider, 1, "acme")
        await first.close()
        with pytest.raises(NodeError) as info:
            await open_box(provider, 2, "globex")
        assert info.value.type == "SandboxNotIsolated" and "NOVA_SANDBOX_INSECURE" in info.value.message
        again = await open_box(provider, 3, "acme")
        await again.close()
    finally:
        await provider.aclose()


async def test_insecure_mode_allows_several_clients() -> None:
    provider = incomplete(Settings(sandbox_pool_size=0, sandbox_insecure=True))
    try:
        for i, client in enumerate(("acme", "globex")):
            box = await open_box(provider, i, client)
            await box.close()
    finally:
        await provider.aclose()


@isolated
async def test_a_fully_isolated_worker_serves_every_client(provider: LocalSandboxProvider) -> None:
    for i, client in enumerate(("acme", "globex", "initech")):
        box = await open_box(provider, i, client)
        await box.close()


async def test_the_start_up_statement_says_what_holds_and_what_is_missing() -> None:
    lines = incomplete(Settings(sandbox_pool_size=0)).statement()
    assert any("MISSING" in line and "network" in line for line in lines)
    assert "one client only" in lines[-1]
    assert "NOVA_SANDBOX_INSECURE=1" in incomplete(Settings(sandbox_pool_size=0, sandbox_insecure=True)).statement()[-1]


@isolated
def test_the_start_up_statement_of_a_fully_isolated_worker() -> None:
    lines = LocalSandboxProvider(Settings(sandbox_pool_size=0)).statement()
    assert not any("MISSING" in line for line in lines) and "every client" in lines[-1]


def test_nova_dev_sets_insecure_and_says_so_unless_set() -> None:
    env, note = sandbox_insecure_env({})
    assert env == {"NOVA_SANDBOX_INSECURE": "1"} and note is not None and "NOVA_SANDBOX_INSECURE=1" in note
    assert sandbox_insecure_env({"NOVA_SANDBOX_INSECURE": "0"}) == ({}, None)


@isolated
async def test_network_egress_refuses_the_host_private_and_metadata_addresses(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    redis_at, pg_at = urlsplit(settings.redis_url), urlsplit(settings.database_url)
    targets = [
        (redis_at.hostname or "127.0.0.1", redis_at.port or 0),
        (pg_at.hostname or "127.0.0.1", pg_at.port or 0),
        (f"::ffff:{redis_at.hostname}", redis_at.port or 0),  # the IPv4-mapped form
        ("169.254.169.254", 80),  # cloud metadata
        ("10.0.0.1", 6379),
    ]
    actions = [_probe(host, port).replace("'reached'", f"'reached{i}'").replace("'error'", f"'error{i}'")
               for i, (host, port) in enumerate(targets)]  # fmt: skip
    wf = await create_workflow(redis, settings, pool, linear(*actions))
    task = await enqueue(redis, settings, wf)
    async with in_process_worker(settings, sandbox_network="egress"):
        events = await wait_terminal(redis, settings, [task.task_id])
    final = events[task.task_id].data["final_context"]
    assert [final[f"reached{i}"] for i in range(len(targets))] == [False] * len(targets), final
    # Refused at once, not a timeout: at route lookup (EACCES) in the host's namespace (bwrap); by an ICMP
    # error ("No route to host") or, for the loopback, by the sandbox's own empty one (fork server).
    errors = {final[f"error{i}"] for i in range(len(targets))}
    assert errors <= {"PermissionError", "OSError", "ConnectionRefusedError"}, final


# Run in a network namespace of its own, so this test's allow-list never touches the machine's rules.
ALLOW_SCRIPT = """
import os, socket, sys
from consumer.sandbox.isolation import install_egress_filter
os.system("ip link set lo up")
os.system("ip addr add 127.0.0.2/8 dev lo 2>/dev/null")
why = install_egress_filter(200000, 249999, ["127.0.0.2/32"])
assert why is None, why
servers = []
for host in ("127.0.0.1", "127.0.0.2"):
    s = socket.socket()
    s.bind((host, 0))
    s.listen()
    servers.append(s)
pid = os.fork()
if pid == 0:
    os.setgroups([]); os.setgid(200007); os.setuid(200007)
    out = []
    for s in servers:
        c = socket.socket()
        try:
            c.connect(s.getsockname())
            out.append("reached")
        except OSError as exc:
            out.append(type(exc).__name__)
    print(" ".join(out), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


@isolated
async def test_egress_allow_list_opens_only_the_named_hosts() -> None:
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--net", sys.executable, "-c", ALLOW_SCRIPT,
        cwd=Path(__file__).resolve().parent.parent, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out.decode().split() == ["PermissionError", "reached"]


@isolated
async def test_closing_mid_refill_leaves_no_process_or_cgroup() -> None:
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=2))
    await provider.start()
    assert provider.cgroups is not None
    parents = provider.cgroups.parents.values()

    def ours() -> set[Path]:
        return {f for parent in parents for f in parent.glob(f"{os.getpid()}-*")}

    # This process's groups before: another test's, still being let go, are not this provider's.
    before = ours()
    box = await open_box(provider, 1)  # starts a refill in the background
    await box.close()
    await provider.aclose()  # cancels it, wherever it is
    assert ours() - before == set()


@isolated
async def test_filling_the_private_tmpfs_past_the_memory_limit_fails_the_node_as_over_the_limit() -> None:
    # tmpfs pages count against the sandbox's cgroup, not against any process's address space: the OOM
    # killer ends the runner, and the node's error names the memory limit (read before the group is let go).
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="none"), memory_limit_mb=128)
    try:
        sb = await open_box(provider, 1)
        code = "chunk = b'x' * (8 << 20)\nwith open('/dev/shm/fill', 'wb') as f:\n"
        code += "    for _ in range(64):\n        f.write(chunk)"
        with pytest.raises(NodeError) as info:
            await sb.run_action("fill", code, {}, 20)
        assert info.value.reason == "limit:memory" and info.value.type == "MemoryLimitExceeded", info.value
        await sb.close()
    finally:
        await provider.aclose()


# --- egress with the fork server: a network namespace of its own per sandbox (consumer/sandbox/netns.py) ---

SERVE = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print('listening', flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b'hello from ' + sys.argv[1].encode())
    c.close()
"""


class OutsideHost:
    """A machine outside this one: a network namespace joined to the host by a veth pair (whose host end
    is not a sandbox's), routed from the host, with a TCP server that greets whoever connects."""

    def __init__(self, name: str, host_side: str, address: str) -> None:
        self.name, self.host_side, self.address = name, host_side, address
        self.veth = f"nvt{name[-9:]}"
        self.server: asyncio.subprocess.Process | None = None

    async def start(self, port: int) -> None:
        ns, veth = self.name, self.veth
        for command in (
            f"ip netns add {ns}",
            f"ip link add {veth} type veth peer name eth0 netns {ns}",
            f"ip addr add {self.host_side}/30 dev {veth}",
            f"ip link set {veth} up",
            f"ip -n {ns} addr add {self.address}/30 dev eth0",
            f"ip -n {ns} link set eth0 up",
            f"ip -n {ns} link set lo up",
            f"ip -n {ns} route add default via {self.host_side}",
        ):
            subprocess.run(command.split(), check=True, capture_output=True)
        self.server = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", ns, sys.executable, "-c", SERVE, self.address, str(port),
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert self.server.stdout is not None
        assert await self.server.stdout.readline() == b"listening\n"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.kill()
            await self.server.wait()
        # The pair now: a namespace's removal takes it away only later, and the next test makes it again.
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def skip_without_egress_namespaces(launch: str) -> None:
    if launch == "bwrap":
        pytest.skip("bwrap keeps the host's network namespace with egress (README, Sandboxes)")
    if find_nft() is None:
        pytest.skip("no nft binary (Debian package nftables): egress falls back to uid policy routing")


def _reach(host: str, port: int) -> str:
    """Node code: connect and read the greeting; context['reached'] is what it read, or the error's
    name (a refusal, never a wait: a timeout would read 'TimeoutError')."""
    return (
        "import socket\n"
        "try:\n"
        f"    c = socket.create_connection(({host!r}, {port}), timeout=5)\n"
        "    context['reached'] = c.recv(100).decode()\n"
        "except OSError as exc:\n"
        "    context['reached'] = type(exc).__name__\n"
    )


def _host_addresses() -> dict[str, str]:
    """This host's own addresses, by kind: its primary IPv4, and IPv6 ULA and link-local if it has them."""
    found: dict[str, str] = {}
    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if parts[1] == "lo" or parts[1].startswith(("nvsb", "nvt")):
            continue
        address = parts[3].split("/")[0]
        kind = {"inet": "v4", "inet6": "ula" if address.startswith(("fc", "fd")) else "ll"}[parts[2]]
        if kind == "ll" and not address.startswith("fe80"):
            continue
        found.setdefault(kind, address if kind != "ll" else f"{address}%eth0")
    return found


@pytest.fixture
async def outside_hosts(launch: str) -> AsyncIterator[tuple[OutsideHost, OutsideHost]]:
    """An 'internet' host (TEST-NET-3, not in any blocked range) and a private 'LAN' host."""
    skip_without_egress_namespaces(launch)
    slot = os.getpid() % 60
    internet = OutsideHost(f"nova-inet-{os.getpid()}", f"203.0.113.{4 * slot + 1}", f"203.0.113.{4 * slot + 2}")
    lan = OutsideHost(f"nova-lan-{os.getpid()}", f"10.77.{slot}.1", f"10.77.{slot}.2")
    try:
        await internet.start(8080)
        await lan.start(8080)
        yield internet, lan
    finally:
        await internet.stop()
        await lan.stop()


ABSTRACT = """
import socket
try:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect({name!r})
    context['abstract'] = 'connected'
except OSError as exc:
    context['abstract'] = type(exc).__name__
"""


@contextlib.asynccontextmanager
async def _service(host: OutsideHost, script: str, port: int) -> AsyncIterator[None]:
    """A service (a script that prints 'listening') on an outside host, for the test's duration."""
    server = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", host.name, sys.executable, "-c", script, host.address, str(port),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None and await server.stdout.readline() == b"listening\n"
        yield
    finally:
        server.kill()
        await server.wait()


async def _acme_then_globex(
    first_code: str, second_code: str, meanwhile: Callable[[], None] | None = None
) -> tuple[dict[str, Any], dict[str, Any], tuple[int, int]]:
    """One node in an egress sandbox of acme's, closed, then one in the next sandbox, globex's (one at a
    time: the slot is lent again); their contexts and the two sandboxes' network slots. `meanwhile` runs
    once the worker's network is set up, before the first sandbox."""
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="egress"))
    contexts: list[dict[str, Any]] = []
    slots: list[int] = []
    try:
        if meanwhile is not None:
            meanwhile()
        for i, (client, code) in enumerate((("acme", first_code), ("globex", second_code))):
            box = await open_box(provider, i + 1, client)
            try:
                contexts.append((await box.run_action(client, code, {}, 20)).context)
                assert box.net is not None
                slots.append(box.net.index)
            finally:
                await box.close()
    finally:
        await provider.aclose()
    return contexts[0], contexts[1], (slots[0], slots[1])


# An outside UDP service that answers at once, remembers who asked, and on "late" sends a late answer to
# the first asker and then a marker to whoever asked for it (both down the same path, in that order).
UDP_SERVE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print('listening', flush=True)
first = None
while True:
    data, peer = s.recvfrom(100)
    if data == b'late':
        s.sendto(b'late answer', first)
        s.sendto(b'marker', peer)
    else:
        first = first or peer
        s.sendto(b'answer', peer)
"""

ASK = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', 40123))
s.settimeout(10)
s.sendto(b'query', ({host!r}, 9053))
context['answer'] = s.recv(100).decode()
"""

LISTEN_FOR_THE_LATE_ANSWER = """
import select, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(('0.0.0.0', 40123))
trigger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
trigger.settimeout(10)
trigger.sendto(b'late', ({host!r}, 9053))
context['marker'] = trigger.recv(100).decode()
ready, _, _ = select.select([s], [], [], 0.5)
context['late'] = s.recv(100).decode() if ready else None
"""


def _start_older_release_worker() -> None:
    """What a worker of the release before slot marking does at its start on this host: replace the
    sandbox table whole (the same rules, none of the marking)."""
    ruleset = host_ruleset([], [r for r in nameservers() if r.replace(".", "").isdigit()])
    older = ruleset[ruleset.index(f"table {TABLE}\n") :]
    assert "ct mark" not in older
    subprocess.run(["nft", "-f", "-"], input=older.encode(), check=True, capture_output=True)


@isolated
@pytest.mark.parametrize("older_worker_started", [False, True])
async def test_a_late_reply_to_a_closed_sandbox_never_reaches_the_next_one_on_its_network_slot(
    launch: str, outside_hosts: tuple[OutsideHost, OutsideHost], older_worker_started: bool
) -> None:
    # Slots (namespace, veth, address) are reused; the host's connection tracking remembered each flow and
    # translated a late UDP reply back to the slot's address, where the next sandbox, another client's,
    # listened on the same port and read it. Also while a worker of the release before (a rolling deploy on
    # one host) replaced the sandbox table after this one's start.
    skip_without_egress_namespaces(launch)
    internet, _ = outside_hosts
    async with _service(internet, UDP_SERVE, 9053):
        asked, seen, slots = await _acme_then_globex(
            ASK.format(host=internet.address),
            LISTEN_FOR_THE_LATE_ANSWER.format(host=internet.address),
            _start_older_release_worker if older_worker_started else None,
        )
    assert asked == {"answer": "answer"}  # the path works both ways
    assert slots[0] == slots[1]  # the same slot, lent again
    # The marker came after the late answer, down the same path: the late answer was not let through.
    assert seen == {"marker": "marker", "late": None}, seen


# An outside TCP service that waits for its client to finish, then closes: the client closes first.
TCP_SERVE_TO_EOF = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print('listening', flush=True)
while True:
    c, _ = s.accept()
    while c.recv(100):
        pass
    c.close()
"""

CONNECT_AND_CLOSE_FIRST = """
import socket
c = socket.create_connection(({host!r}, 9080), timeout=10)
c.shutdown(socket.SHUT_WR)
context['eof'] = c.recv(100) == b''  # the service's close: this side goes to TIME_WAIT
c.close()
"""

LIST_TCP = "context['tcp'] = open('/proc/net/tcp').read().splitlines()[1:]"


@isolated
async def test_the_next_sandbox_on_a_network_slot_sees_none_of_the_last_ones_connections(
    launch: str, outside_hosts: tuple[OutsideHost, OutsideHost]
) -> None:
    # A namespace's /proc/net/tcp (and sock_diag) lists every TCP socket in it, TIME_WAIT included, remote
    # address and port with it: a connection its last sandbox closed first stayed there a minute for the
    # next sandbox on the slot, another client's, to read.
    skip_without_egress_namespaces(launch)
    internet, _ = outside_hosts
    async with _service(internet, TCP_SERVE_TO_EOF, 9080):
        closed, listed, _ = await _acme_then_globex(CONNECT_AND_CLOSE_FIRST.format(host=internet.address), LIST_TCP)
    assert closed == {"eof": True}
    seen = listed["tcp"]
    assert seen == [], seen


@isolated
async def test_egress_sandbox_reaches_the_internet_only_from_a_namespace_of_its_own(
    launch: str, settings: Settings, redis: Redis, pool: asyncpg.Pool, outside_hosts: tuple[OutsideHost, OutsideHost]
) -> None:
    skip_without_egress_namespaces(launch)
    internet, lan = outside_hosts
    own = _host_addresses()
    # A host process's abstract unix socket (the kind D-Bus, X11 and container runtimes listen on).
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"\0nova-test-{os.getpid()}"
    listener.bind(name)
    listener.listen()
    targets = {
        "internet": (internet.address, 8080),
        "lan": (lan.address, 8080),
        "lan_mapped": (f"::ffff:{lan.address}", 8080),
        "metadata": ("169.254.169.254", 80),
        "host_loopback": (urlsplit(settings.redis_url).hostname or "127.0.0.1", urlsplit(settings.redis_url).port),
        **{f"host_{kind}": (address, 22) for kind, address in own.items()},
    }
    actions = [_reach(h, p or 0).replace("'reached'", f"'{key}'") for key, (h, p) in targets.items()]
    actions.append(ABSTRACT.format(name=name))
    actions.append("import socket\ncontext['interfaces'] = sorted(n for _, n in socket.if_nameindex())")
    wf = await create_workflow(redis, settings, pool, linear(*actions))
    task = await enqueue(redis, settings, wf)
    try:
        async with in_process_worker(settings, sandbox_network="egress"):
            events = await wait_terminal(redis, settings, [task.task_id])
    finally:
        listener.close()
    final = events[task.task_id].data["final_context"]
    assert final["internet"] == f"hello from {internet.address}", final
    refused = {key: final[key] for key in targets if key != "internet"}
    assert all(not v.startswith("hello") and v != "TimeoutError" for v in refused.values()), refused
    # Refused before any lookup: node code makes no Unix socket (the seccomp filter); in a network
    # namespace of its own the host's abstract names would not be found either.
    assert final["abstract"] == "PermissionError", final
    assert final["interfaces"] == ["eth0", "lo"], final


@isolated
async def test_two_live_egress_sandboxes_are_in_different_network_namespaces(launch: str) -> None:
    skip_without_egress_namespaces(launch)
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="egress"))
    code = "import os\ncontext['ns'] = os.stat('/proc/self/ns/net').st_ino"
    try:
        first, second = await open_box(provider, 1), await open_box(provider, 2)
        seen = [(await box.run_action("ns", code, {}, 5)).context["ns"] for box in (first, second)]
        await first.close()
        # The first one's namespace is free again, and the next sandbox gets it (prepared once, reused).
        third = await open_box(provider, 3)
        again = (await third.run_action("ns", code, {}, 5)).context["ns"]
        await second.close()
        await third.close()
    finally:
        await provider.aclose()
    assert seen[0] != seen[1] and os.stat("/proc/self/ns/net").st_ino not in seen
    assert again == seen[0]


# Node code: serve a greeting on port 9000 of every address of its sandbox from a thread that outlives
# the node (the sandbox lives on for the execution's next nodes), and give the sandbox's own address.
_LISTEN = (
    "import socket, threading\n"
    "server = socket.socket()\n"
    "server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "server.bind(('0.0.0.0', 9000))\n"
    "server.listen()\n"
    "def serve():\n"
    "    while True:\n"
    "        conn, _ = server.accept()\n"
    "        conn.sendall(b'hello from a sandbox')\n"
    "        conn.close()\n"
    "threading.Thread(target=serve, daemon=True).start()\n"
    "probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    "probe.connect(('203.0.113.1', 9))\n"
    "context['address'] = probe.getsockname()[0]\n"
)


@isolated
async def test_an_egress_sandbox_cannot_reach_another_live_sandbox(launch: str) -> None:
    skip_without_egress_namespaces(launch)
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="egress"))
    try:
        listener, other = await open_box(provider, 1, "acme"), await open_box(provider, 2, "globex")
        address = (await listener.run_action("listen", _LISTEN, {}, 5)).context["address"]
        # The listener answers in its own sandbox: what the other one gets is the network's refusal.
        own = (await listener.run_action("self", _reach(address, 9000), {}, 10)).context["reached"]
        theirs = (await other.run_action("other", _reach(address, 9000), {}, 10)).context["reached"]
        await listener.close()
        await other.close()
    finally:
        await provider.aclose()
    assert own == "hello from a sandbox"
    assert theirs == "OSError", theirs


# Run in a network and mount namespace of its own: resolv.conf names a resolver on the host's loopback
# (127.0.0.53), which answers every query with "answer:" and the query.
LOOPBACK_RESOLVER = """
import asyncio, os, socket, subprocess, sys, tempfile, threading
subprocess.run("ip link set lo up", shell=True, check=True)
conf = tempfile.NamedTemporaryFile("w", suffix=".conf", delete=False)
conf.write("nameserver 127.0.0.53\\n")
conf.close()
subprocess.run(["mount", "--bind", conf.name, "/etc/resolv.conf"], check=True)
sys.path.insert(0, os.getcwd())
from consumer.sandbox.base import SandboxSpec
from consumer.sandbox.local import LocalSandboxProvider
from shared.settings import Settings

resolver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
resolver.bind(("127.0.0.53", 53))

def answer():
    while True:
        data, peer = resolver.recvfrom(512)
        resolver.sendto(b"answer:" + data, peer)

threading.Thread(target=answer, daemon=True).start()
"""


# In a network and mount namespace of its own (so neither its allow-list nor its resolv.conf touches the
# machine's): a worker's egress sandbox reaches an allow-listed private host, and a resolver on the
# host's loopback named by resolv.conf; another private host stays refused.
ALLOW_AND_DNS_SCRIPT = (
    LOOPBACK_RESOLVER
    + """
from tests.test_sandbox_attacks import OutsideHost
CODE = '''
import socket
out = []
for host in ("10.88.0.2", "10.89.0.2"):
    try:
        out.append(socket.create_connection((host, 8080), timeout=5).recv(100).decode())
    except OSError as exc:
        out.append(type(exc).__name__)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(b"query", ("127.0.0.53", 53))
out.append(s.recv(100).decode())
context["out"] = out
'''

async def main():
    allowed = OutsideHost("t-allowed", "10.88.0.1", "10.88.0.2")
    other = OutsideHost("t-other", "10.89.0.1", "10.89.0.2")
    await allowed.start(8080)
    await other.start(8080)
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="egress",
                                             sandbox_launch="fork", sandbox_egress_allow="10.88.0.2/32"))
    try:
        assert provider.egress_networks is not None, provider.statement()
        box = await provider.open(SandboxSpec(execution_id=1, client="acme"))
        print("|".join((await box.run_action("n", CODE, {}, 20)).context["out"]), flush=True)
        await box.close()
    finally:
        await provider.aclose()
        await allowed.stop()
        await other.stop()

asyncio.run(main())
"""
)


@isolated
async def test_egress_namespace_allows_the_allow_list_and_a_resolver_on_the_hosts_loopback(
    launch: str, tmp_path: Path
) -> None:
    skip_without_egress_namespaces(launch)
    out = await in_own_netns(ALLOW_AND_DNS_SCRIPT, tmp_path, mount=True)
    assert out.strip().split("|") == ["hello from 10.88.0.2", "OSError", "answer:query"], out


# In a network and mount namespace of its own: a second worker starts once the host has an address in the
# first worker's private block, so it picks another block and applies the host's table again; a live
# sandbox of the first worker still reaches the resolver on the host's loopback.
DNS_AFTER_ANOTHER_BLOCK_SCRIPT = (
    LOOPBACK_RESOLVER
    + """
CODE = '''
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
try:
    s.sendto(b"query", ("127.0.0.53", 53))
    context["out"] = s.recv(100).decode()
except OSError as exc:
    context["out"] = type(exc).__name__
'''

async def main():
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="egress", sandbox_launch="fork"))
    try:
        networks = provider.egress_networks
        assert networks is not None, provider.statement()
        box = await provider.open(SandboxSpec(execution_id=1, client="acme"))
        print((await box.run_action("n", CODE, {}, 20)).context["out"], flush=True)
        subprocess.run("ip link add taken0 type veth peer name taken1", shell=True, check=True)
        subprocess.run(f"ip addr add {networks.block.network_address + 200 * 256 + 1}/24 dev taken0", shell=True,
                       check=True)
        second = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="egress", sandbox_launch="fork"))
        try:
            assert second.egress_networks is not None and second.egress_networks.block != networks.block
            print((await box.run_action("n", CODE, {}, 20)).context["out"], flush=True)
        finally:
            await second.aclose()
        await box.close()
    finally:
        await provider.aclose()

asyncio.run(main())
"""
)


@isolated
async def test_a_resolver_on_the_hosts_loopback_stays_reachable_whichever_block_the_table_names(
    launch: str, tmp_path: Path
) -> None:
    skip_without_egress_namespaces(launch)
    out = await in_own_netns(DNS_AFTER_ANOTHER_BLOCK_SCRIPT, tmp_path, mount=True)
    assert out.split() == ["answer:query", "answer:query"], out


# In a network namespace of its own: sandboxes in namespaces have no IPv6, so an IPv6 entry of the
# allow-list cannot be reached from them; the worker says so at start-up rather than let it fail quietly.
IPV6_ALLOW_SCRIPT = """
import logging, subprocess, sys
subprocess.run("ip link set lo up".split(), check=True)
logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
from consumer.sandbox.netns import EgressNetworks
networks, why = EgressNetworks.start(["fd12:3456::/48", "10.88.0.2/32"])
assert networks is not None, why
networks.close()
"""


@isolated
async def test_an_ipv6_allow_list_entry_is_said_to_be_out_of_reach(launch: str, tmp_path: Path) -> None:
    skip_without_egress_namespaces(launch)
    out = await in_own_netns(IPV6_ALLOW_SCRIPT, tmp_path)
    said = [line for line in out.splitlines() if "fd12:3456::/48" in line]
    assert len(said) == 1 and "no IPv6" in said[0] and "10.88.0.2" not in said[0], out


async def in_own_netns(script: str, tmp_path: Path, mount: bool = False) -> str:
    """What `script` prints, run by this Python in a network namespace of its own (and a mount namespace,
    with `mount`) with `tmp_path` as its TMPDIR (so its slot leases are its own), from the project's
    folder; it must succeed."""
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--net", *(["--mount"] if mount else []), sys.executable, "-c", script,
        cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "TMPDIR": str(tmp_path)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-3000:]
    return out.decode()


# In a network namespace of its own with a lock folder of its own (TMPDIR), so slot 0 is the one leased:
# a killed worker's interface still there (here with its peer beside it, which no namespace's removal
# takes away) is deleted and the slot made again.
LEFTOVER_SCRIPT = """
import subprocess
for command in ("ip link set lo up", "ip link add nvsb0 type veth peer name leftover0",
                "ip addr add 10.213.0.1/30 dev nvsb0"):
    subprocess.run(command.split(), check=True)
from consumer.sandbox.netns import EgressNetworks
networks, why = EgressNetworks.start([])
assert networks is not None, why
kind = subprocess.run("ip -d -o link show nvsb0", shell=True, capture_output=True, text=True).stdout
print("veth" if " veth " in kind else kind, flush=True)
networks.close()
print(subprocess.run("ip -o link show", shell=True, capture_output=True, text=True).stdout.count("nvsb"))
"""


@isolated
async def test_a_killed_workers_leftover_interface_does_not_break_the_next_start(launch: str, tmp_path: Path) -> None:
    skip_without_egress_namespaces(launch)
    out = await in_own_netns(LEFTOVER_SCRIPT, tmp_path)
    # The slot's veth took the leftover's place, and closing the pool removed it.
    assert out.split() == ["veth", "0"], out


# In a network namespace of its own with a lock folder of its own: a sandbox start cancelled while its slot
# is being made (a pool refill at close, an execution given up) still gets the slot into the free list.
CANCELLED_LEND_SCRIPT = """
import asyncio, subprocess
subprocess.run("ip link set lo up".split(), check=True)
from consumer.sandbox.netns import EgressNetworks
networks, why = EgressNetworks.start([])
assert networks is not None, why
async def main():
    first = await networks.lend()  # the one made at start: none is free now
    lending = asyncio.ensure_future(networks.lend())
    await asyncio.sleep(0)  # making one on the slot thread
    lending.cancel()
    try:
        await lending
    except asyncio.CancelledError:
        pass
    networks._thread.submit(lambda: None).result()  # the slot thread is done making it
    await asyncio.sleep(0.1)  # and its completion has reached this loop
    print(len(networks._free), flush=True)
    networks.give_back(first)
asyncio.run(main())
networks.close()
"""


@isolated
async def test_a_slot_made_for_a_cancelled_start_is_not_lost(launch: str, tmp_path: Path) -> None:
    skip_without_egress_namespaces(launch)
    out = await in_own_netns(CANCELLED_LEND_SCRIPT, tmp_path)
    assert out.split() == ["1"], out


# In a network namespace of its own: a process of a sandbox uid keeps trying the host's loopback while
# workers start one after the other (each installs the policy routing filter again): it is never let
# through, not even while a start replaces an earlier worker's rules.
REINSTALL_SCRIPT = """
import os, socket, sys, threading
from consumer.sandbox.isolation import _install_egress_filter
os.system("ip link set lo up")
assert _install_egress_filter(200000, 249999, []) is None
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(1024)
stop_r, stop_w = os.pipe()
pid = os.fork()
if pid != 0:
    # Accepted and closed as they come: a full backlog would leave the next connect waiting.
    threading.Thread(target=lambda: [server.accept()[0].close() for _ in iter(int, 1)], daemon=True).start()
if pid == 0:
    os.setgroups([]); os.setgid(200009); os.setuid(200009)
    os.set_blocking(stop_r, False)
    reached = tries = 0
    while True:
        try:
            os.read(stop_r, 1)
            break
        except BlockingIOError:
            pass
        c = socket.socket()
        # A SYN let through, whose retransmission the rules then refuse, would wait minutes.
        c.settimeout(1)
        try:
            c.connect(server.getsockname())
            reached += 1
        except OSError:
            pass
        c.close()
        tries += 1
    print(reached, tries, flush=True)
    os._exit(0)
for i in range(10):
    assert _install_egress_filter(200000, 249999, [f"192.0.2.{i}/32"]) is None
os.write(stop_w, b"x")
os.waitpid(pid, 0)
"""


@isolated
async def test_a_worker_start_never_lifts_the_policy_routing_filter_of_live_sandboxes(launch: str) -> None:
    if launch != "bwrap":
        pytest.skip("the policy routing filter is the bwrap (and fallback) path; one run is enough")
    proc = await asyncio.create_subprocess_exec(
        "unshare", "--net", sys.executable, "-c", REINSTALL_SCRIPT,
        cwd=Path(__file__).resolve().parent.parent, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-3000:]
    reached, tries = map(int, out.split())
    assert tries > 0 and reached == 0, out.decode()


@isolated
async def test_another_workers_start_and_end_leave_a_live_egress_sandbox_working(
    launch: str, outside_hosts: tuple[OutsideHost, OutsideHost]
) -> None:
    skip_without_egress_namespaces(launch)
    internet, lan = outside_hosts
    first = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="egress"))
    code = _reach(internet.address, 8080) + _reach(lan.address, 8080).replace("'reached'", "'lan'")
    try:
        box = await open_box(first, 1)
        # Another worker of the host starts (the ruleset applied again), opens and closes a sandbox, ends.
        second = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="egress"))
        other = await open_box(second, 2)
        await other.close()
        await second.aclose()
        seen = (await box.run_action("reach", code, {}, 20)).context
        await box.close()
    finally:
        await first.aclose()
    assert seen["reached"] == f"hello from {internet.address}" and seen["lan"] == "OSError", seen


# --- the reply channel: node code runs in the runner's interpreter and can write frames of its own ---

# Writes one frame of its choosing on the runner's reply pipe (fd 4: the runner's private copy of its
# stdout, as /proc/self/fd shows it), then waits for the worker to take it for the node's reply.
FORGE = """
import json, os, struct, time
payload = json.dumps({reply}).encode()
os.write(4, struct.pack('>I', len(payload)) + payload)
time.sleep(5)
"""

FORGED_REPLIES = [
    {"ok": True},  # no context
    {"ok": True, "context": [1, 2]},
    {"ok": True, "context": {}, "stdout": 5},
    {"ok": False, "error": "not an object"},
    {"ok": False, "error": {"type": "X", "message": {"not": "text"}}},
    {"context": {}},  # no ok
    # Iterated in the worker (a TypeError there left the entry pending: the node ran on every delivery).
    {"ok": False, "error": {"type": "X", "message": "m", "traceback": "", "reason": "exception", "bases": 5}},
    {"ok": True, "context": {}, "duration_ms": "slow"},
]


@isolated
@pytest.mark.parametrize(
    "reply", FORGED_REPLIES, ids=lambda r: "-".join(f"{k}={type(v).__name__}" for k, v in r.items())
)
async def test_a_forged_reply_of_the_wrong_shape_fails_the_node(
    provider: LocalSandboxProvider, reply: dict[str, object]
) -> None:
    sb = await open_box(provider, 1)
    try:
        with pytest.raises(NodeError) as info:
            await sb.run_action("forge", FORGE.format(reply=reply), {}, 20)
        assert info.value.type == "BadReply" and info.value.reason == "output", info.value
        assert sb.dead  # the protocol is out of step: the sandbox is not trusted after it
    finally:
        await sb.close()


@isolated
async def test_a_forged_reply_fails_the_execution_once_not_on_every_redelivery(
    settings: Settings, redis: Redis, pool: asyncpg.Pool
) -> None:
    # Before: a KeyError in the worker, "unexpected error; left pending for redelivery": the node ran on
    # every delivery until the entry was dead-lettered for max_deliveries.
    from shared.events import EventType

    wf = await create_workflow(redis, settings, pool, linear("context['x'] = 1", FORGE.format(reply={"ok": True})))
    task = await enqueue(redis, settings, wf)
    async with in_process_worker(settings, sandbox_network="none"):
        done = (await wait_terminal(redis, settings, [task.task_id]))[task.task_id]
    assert done.type == EventType.FAILED, done.data
    error = done.data["error"]
    assert error["node_id"] == "a2" and error["type"] == "BadReply" and error["reason"] == "output", error


# --- what a sandbox leaves behind for the next one, and what it can reach in the kernel ---

# The kernel's key syscalls by architecture (Python has no binding): add_key, keyctl.
_KEY_SYSCALLS = {"x86_64": (248, 250), "aarch64": (217, 219)}
_KEYS = """
import ctypes, os, platform
libc = ctypes.CDLL(None, use_errno=True)
ADD_KEY, KEYCTL = SYSCALLS[platform.machine()]
USER_KEYRING, GET_PERSISTENT, SEARCH, READ, CLEAR = -4, 22, 10, 11, 7
persistent = libc.syscall(KEYCTL, GET_PERSISTENT, -1, USER_KEYRING)
rings = {'user': USER_KEYRING, 'persistent': persistent}
"""
PLANT_KEYS = (
    _KEYS
    + """
for name, ring in rings.items():
    libc.syscall(ADD_KEY, b'user', b'nova-planted', b'from-acme', 9, ring)
"""
)
FIND_KEYS = (
    _KEYS
    + """
found = {}
buf = ctypes.create_string_buffer(64)
for name, ring in rings.items():
    key = libc.syscall(KEYCTL, SEARCH, ring, b'user', b'nova-planted', 0)
    if key > 0:
        found[name] = buf.raw[:libc.syscall(KEYCTL, READ, key, buf, 64)].decode()
context['found'] = found
"""
)
CLEAR_KEYS = (
    _KEYS
    + """
for ring in rings.values():
    libc.syscall(KEYCTL, CLEAR, ring)
"""
)


@isolated
async def test_a_key_left_in_the_kernels_keyrings_is_not_found_by_the_next_sandbox_of_its_uid(
    provider: LocalSandboxProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # FAILING: the user keyring and the persistent keyring (kept three days) are the kernel's, per uid,
    # and outlive every process of it; the next execution leased the same uid (another client's) reads
    # what the first left. Docker's default seccomp profile refuses add_key, keyctl and request_key.
    import platform

    if platform.machine() not in _KEY_SYSCALLS:
        pytest.skip(f"no key syscall numbers for {platform.machine()}")
    syscalls = repr(_KEY_SYSCALLS)
    # Both sandboxes lease the same uid (the lease starts its search at a random number).
    monkeypatch.setattr("consumer.sandbox.isolation.random.randrange", lambda span: 40_000 + os.getpid() % 5_000)
    first = await open_box(provider, 1, "acme")
    assert first.lease is not None
    uid = first.lease.uid
    try:
        await first.run_action("plant", PLANT_KEYS.replace("SYSCALLS", syscalls), {}, 10)
        await first.close()
        second = await open_box(provider, 2, "globex")
        assert second.lease is not None and second.lease.uid == uid
        try:
            seen = (await second.run_action("find", FIND_KEYS.replace("SYSCALLS", syscalls), {}, 10)).context
        finally:
            await second.close()
    finally:
        # What the sandboxes left in the kernel goes, whatever the outcome (imports first: the uid may not
        # read this interpreter's library).
        become = f"os.setgroups([]); os.setresgid({uid}, {uid}, {uid}); os.setresuid({uid}, {uid}, {uid})\n"
        clear = "import ctypes, os, platform\n" + become
        context = "context = {}\n"
        subprocess.run([sys.executable, "-c", clear + context + CLEAR_KEYS.replace("SYSCALLS", syscalls)], check=True)
    assert seen["found"] == {}, seen


CLONE_NEWUSER = 0x10000000
USER_NAMESPACE = f"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
context['unshare'] = libc.unshare({CLONE_NEWUSER}) or 'created'
if context['unshare'] == 'created':
    context['caps'] = [line for line in open('/proc/self/status').read().splitlines() if line.startswith('CapEff')]
"""


@isolated
async def test_node_code_cannot_make_a_user_namespace(provider: LocalSandboxProvider) -> None:
    # FAILING: without a seccomp filter node code makes a user namespace, where it holds every capability
    # (CapEff 1ff...): network, mount and nftables code of the kernel that an unprivileged process never
    # reaches, the usual first step of a local privilege escalation (CVE-2024-1086 in nf_tables). bwrap
    # offers --disable-userns; Docker's default seccomp profile refuses it.
    sb = await open_box(provider, 1)
    try:
        seen = (await sb.run_action("userns", USER_NAMESPACE, {}, 10)).context
    finally:
        await sb.close()
    assert seen["unshare"] != "created", seen


@isolated
async def test_filling_the_work_folder_past_the_memory_limit_fails_the_node(launch: str) -> None:
    # FAILING with bwrap (and the plain fallback): the work folder is a folder on the host's disk, capped
    # per file (256 MiB) but not in total, so one node fills the host's disk (its Redis, PostgreSQL) for as
    # long as its execution lives. The fork server's is on the sandbox's own tmpfs, counted as memory.
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0, sandbox_network="none"), memory_limit_mb=128)
    code = "import os\nchunk = b'x' * (4 << 20)\nfor n in range(3):\n    with open(f'fill{n}', 'wb') as f:\n"
    code += "        for _ in range(25):\n            f.write(chunk)\ncontext['where'] = os.getcwd()"
    try:
        sb = await open_box(provider, 1)
        try:
            with pytest.raises(NodeError) as info:
                await sb.run_action("fill", code, {}, 60)
            assert info.value.reason == "limit:memory" or "space" in info.value.message, info.value
        finally:
            await sb.close()
    finally:
        await provider.aclose()


# Calls Python has no binding for, by architecture: bpf, perf_event_open, userfaultfd, io_uring_setup.
_KERNEL_SURFACE = {"x86_64": (321, 298, 323, 425), "aarch64": (280, 241, 282, 425)}
KERNEL_SURFACE = """
import ctypes, errno, os, platform
libc = ctypes.CDLL(None, use_errno=True)
BPF, PERF, USERFAULTFD, IO_URING_SETUP = SYSCALLS[platform.machine()]
params = ctypes.create_string_buffer(120)
attr = ctypes.create_string_buffer(128)
calls = {
    'bpf': lambda: libc.syscall(BPF, 0, attr, 128),
    'perf_event_open': lambda: libc.syscall(PERF, attr, 0, -1, -1, 0),
    'userfaultfd': lambda: libc.syscall(USERFAULTFD, 0),
    'io_uring_setup': lambda: libc.syscall(IO_URING_SETUP, 4, params),
    'mount': lambda: libc.mount(b'none', b'/tmp', b'tmpfs', 0, None),
    'setns': lambda: libc.setns(os.open('/proc/self/ns/net', os.O_RDONLY), 0),
    'unshare_net': lambda: libc.unshare(0x40000000),
    'ptrace': lambda: attach(),
    'process_vm_readv': lambda: libc.process_vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0),
}
class iovec(ctypes.Structure):
    _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]
source, target = ctypes.create_string_buffer(8), ctypes.create_string_buffer(8)
local = iovec(ctypes.cast(target, ctypes.c_void_p), 8)
remote = iovec(ctypes.cast(source, ctypes.c_void_p), 8)
def attach():
    # PTRACE_ATTACH to a child of its own, which ptrace's own rules (and Yama's) would allow.
    pid = os.fork()
    if pid == 0:
        os.read(os.pipe()[0], 1)  # waits, until killed
        os._exit(0)
    try:
        return libc.ptrace(16, pid, None, None)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
for name, call in calls.items():
    context[name] = errno.errorcode.get(ctypes.get_errno(), '?') if call() < 0 else 'allowed'
context['seccomp'] = [line.split()[1] for line in open('/proc/self/status') if line.startswith('Seccomp:')]
"""


@isolated
async def test_the_seccomp_filter_refuses_kernel_surface_node_code_never_needs(provider: LocalSandboxProvider) -> None:
    import platform

    if platform.machine() not in _KERNEL_SURFACE:
        pytest.skip(f"no syscall numbers for {platform.machine()}")
    sb = await open_box(provider, 1)
    try:
        code = KERNEL_SURFACE.replace("SYSCALLS", repr(_KERNEL_SURFACE))
        seen = (await sb.run_action("surface", code, {}, 10)).context
    finally:
        await sb.close()
    assert seen.pop("seccomp") == ["2"], seen  # a filter is loaded (mode 2)
    assert seen == {name: "EPERM" for name in seen}, seen


ORDINARY = """
import asyncio, multiprocessing, os, socket, subprocess, threading
context['subprocess'] = subprocess.run(['sh', '-c', 'echo hi'], capture_output=True, text=True).stdout
pid = os.fork()
if pid == 0:
    os._exit(7)
context['fork'] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
box = []
thread = threading.Thread(target=box.append, args=(1,))
thread.start()
thread.join()
context['thread'] = box
with multiprocessing.get_context('fork').Pool(2) as pool:
    context['multiprocessing'] = pool.map(abs, [-1, -2])
with multiprocessing.get_context('spawn').Pool(1) as pool:
    context['spawn'] = pool.map(abs, [-3])
async def echo():
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    b.sendall(b'ping')
    got = await reader.readexactly(4)
    writer.close()
    b.close()
    return got.decode()
context['asyncio'] = asyncio.run(echo())
with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
    server.bind(('127.0.0.1', 0))
    server.listen()
    with socket.create_connection(server.getsockname()) as client:
        conn, _ = server.accept()
        client.sendall(b'x')
        context['tcp'] = conn.recv(1).decode()
        conn.close()
"""


@isolated
async def test_ordinary_node_code_runs_under_the_seccomp_filter(provider: LocalSandboxProvider) -> None:
    # clone3 is refused with ENOSYS: libc's threads and posix_spawn fall back to clone.
    sb = await open_box(provider, 1)
    try:
        seen = (await sb.run_action("ordinary", ORDINARY, {}, 60)).context
    finally:
        await sb.close()
    assert seen == {
        "subprocess": "hi\n",
        "fork": 7,
        "thread": [1],
        "multiprocessing": [1, 2],
        "spawn": [3],
        "asyncio": "ping",
        "tcp": "x",
    }, seen


@isolated
async def test_node_codes_spawned_processes_do_not_import_the_sandbox_program(provider: LocalSandboxProvider) -> None:
    # multiprocessing's spawn children import the parent's __main__ again from its file, which the sandbox
    # may not see (an install under /tmp is hidden by its private /tmp): with it named, they died at start
    # and a spawn pool waited until the node's time limit.
    code = (
        "import multiprocessing.spawn as s\n"
        "context['main'] = sorted(k for k in s.get_preparation_data('x') if 'main' in k)"
    )
    sb = await open_box(provider, 1)
    try:
        seen = (await sb.run_action("spawn", code, {}, 20)).context
    finally:
        await sb.close()
    assert seen == {"main": []}, seen


def test_without_libseccomp_the_statement_says_the_filter_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("consumer.sandbox.local.compiled_seccomp", lambda: (None, "libseccomp is missing"))
    provider = LocalSandboxProvider(Settings(sandbox_pool_size=0))
    if provider.launcher == "plain process":
        pytest.skip("no sandbox launcher here: the filter is missing for that reason already")
    assert not provider.isolation.complete
    missing = [line for line in provider.statement() if "MISSING" in line and "seccomp" in line]
    assert missing and "libseccomp is missing" in missing[0], provider.statement()


# A background child of node code that writes on the reply pipe between nodes (while the worker waits for
# no reply) makes the worker read it into memory, outside any cgroup, up to twice its reader's limit.
BACKGROUND_WRITER = """
import os
if os.fork() == 0:
    junk = b'x' * 65536
    while True:
        os.write(1, junk)
"""


@isolated
async def test_junk_on_the_reply_pipe_between_nodes_is_buffered_by_the_worker_only_up_to_a_mebibyte(
    provider: LocalSandboxProvider,
) -> None:
    sb = await open_box(provider, 1)
    try:
        # A reply far larger than the reader's buffer still arrives whole (readexactly resumes the pipe).
        big = (await sb.run_action("big", "context['s'] = 'y' * (8 << 20)", {}, 30)).context
        assert big == {"s": "y" * (8 << 20)}
        await sb.run_action("junk", BACKGROUND_WRITER, {}, 10)
        # asyncio pauses the pipe once it holds twice the limit: the limit is what node code can make the
        # worker hold (it was twice the context cap and 1 MiB more: 66 MiB with the default 16 MiB cap).
        assert sb.proc.stdout is not None
        assert sb.proc.stdout._limit <= 1 << 20  # type: ignore[attr-defined]
    finally:
        await sb.close()
