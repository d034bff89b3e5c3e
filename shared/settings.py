"""Typed configuration for every NOVA process, read once from the environment.

The three deployment-wide variables keep their conventional names (REDIS_URL, DATABASE_URL,
E2B_API_KEY, PORT) so that Railway's service references work unchanged; everything specific to
NOVA is prefixed with ``NOVA_``.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from functools import cache
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.lanes import Lane, parse_lane_weights


@cache
def _format_version() -> int:
    """shared.streams.FORMAT_VERSION, imported once (that module imports this one): an import statement
    run at each read of readable_format cost a worker about 2 us, a couple of times per run."""
    from shared.streams import FORMAT_VERSION

    return FORMAT_VERSION


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NOVA_", extra="ignore", populate_by_name=True)

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "redis_url"),
        description="Redis server URL (REDIS_URL). Unset: `nova dev` starts an embedded Redis.",
    )
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "database_url"),
        description="PostgreSQL URL (DATABASE_URL). Unset: `nova dev` starts an embedded PostgreSQL.",
    )
    e2b_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("E2B_API_KEY", "e2b_api_key"),
        description="E2B API key (E2B_API_KEY); needed only for nodes that run with executor 'e2b'.",
    )
    sentry_dsn: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SENTRY_DSN", "sentry_dsn"),
        description="Sentry DSN (SENTRY_DSN): report unhandled errors and failed executions there; unset: off.",
    )
    admin_key: SecretStr | None = Field(
        default=None, description="Operators' API key (Bearer); unset: no admin access over HTTP."
    )
    secrets_key: SecretStr | None = Field(
        default=None, description="Fernet key that encrypts client credentials at rest (`nova secrets-key`)."
    )
    host: str = Field(default="0.0.0.0", description="Address the API binds to (NOVA_HOST).")
    client_rate: float = Field(
        default=100.0, gt=0, description="Executions per second one client may start (token bucket, all replicas)."
    )
    client_burst: int = Field(default=200, ge=1, description="Executions one client may start in a burst.")
    client_max_inflight: int = Field(
        default=1000, ge=0, description="Accepted, unfinished executions one client may have (0: no cap)."
    )
    durability: Literal["relaxed", "strict"] = Field(
        default="relaxed",
        description="strict: the API answers 202 only once the request is on a replica (WAIT) or fsynced "
        "(appendfsync always), else 503; relaxed: once Redis has it in memory.",
    )
    strict_wait_ms: int = Field(default=1000, ge=1, description="How long strict mode waits for a replica (ms).")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="Largest request body the API accepts.")
    port: int = Field(
        default=8000,
        validation_alias=AliasChoices("PORT", "NOVA_PORT", "port"),
        description="Port the API listens on (PORT, Railway's convention).",
    )
    max_json_depth: int = Field(
        default=64, ge=2, le=512, description="Deepest nesting of arrays and objects a JSON request body may have."
    )
    max_header_bytes: int = Field(
        default=64 * 1024, ge=4096, description="Largest request line plus headers the API accepts (431 beyond)."
    )
    cors_origins: str = Field(
        default="",
        description="Origins browsers may call the API from, comma-separated (e.g. a dashboard's URL); empty: none.",
    )
    sse_replay_max_bytes: int = Field(
        default=4 << 20,
        ge=1024,
        description="Bytes of the results stream one Last-Event-ID resume of GET /events may read before it stops.",
    )
    sse_replay_max_entries: int = Field(
        default=10_000, ge=1, description="Results-stream entries one Last-Event-ID resume of GET /events may scan."
    )
    sse_max_connections_per_key: int = Field(
        default=20, ge=1, description="Open event streams one API key may hold on one API process (429 beyond)."
    )
    session_ttl: int = Field(
        default=8 * 3600,
        ge=60,
        le=30 * 24 * 3600,
        description="Seconds a dashboard sign-in (session cookie) lasts; signing out or a rotated key ends it sooner.",
    )

    requests_stream: str = Field(default="nova:requests", description="Stream of execution requests.")
    results_stream: str = Field(default="nova:results", description="Stream of status events.")
    dead_letter_stream: str = Field(default="nova:dlq", description="Stream of dead-lettered requests.")
    worker_group: str = Field(default="nova-workers", description="Consumer group of the workers.")
    projector_group: str = Field(
        default="nova-projector", description="Consumer group that projects events to PostgreSQL."
    )
    key_prefix: str = Field(default="nova", description="Prefix of every other Redis key NOVA writes.")
    redis_cluster: bool = Field(
        default=False,
        description="REDIS_URL names a node of a Redis Cluster: use the cluster client (follows MOVED/ASK) and "
        "hash-tagged key names (also set by a redis+cluster:// or rediss+cluster:// URL).",
    )
    shards: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Shards the requests and results streams are split into (each with its own consumer groups); "
        "a client's executions all go to one shard.",
    )

    concurrency: int = Field(default=10, ge=1, le=1000, description="Executions in flight per worker.")
    node_retry_park_after: float = Field(
        default=1.0,
        ge=0,
        description="A node retry (its `retry` policy) waiting at least this many seconds gives its worker slot "
        "back meanwhile: the run waits in the delayed set and resumes at the node when due (shorter waits "
        "stay in the slot).",
    )
    lane_weights: str = Field(
        default="high:4,normal:2,low:1",
        description="How a worker shares its free slots among the priority lanes that have runs waiting: "
        "`lane:weight` for high, normal and low, each weight 1 to 100 (consumer/slots.py).",
    )
    consumer_name: str | None = Field(
        default=None, description="Consumer name in the group; default host-pid-random, unique per process."
    )
    execution_timeout: float = Field(
        default=600.0, gt=0, description="Seconds one execution may run (a workflow may set its own)."
    )
    node_timeout: float = Field(
        default=60.0, gt=0, description="Default seconds for one node (a node may set `timeout`; NOVA's default)."
    )
    max_node_timeout: float = Field(
        default=300.0,
        gt=0,
        description="Largest `timeout` a node may set; a workflow asking for more is refused (422) naming the node.",
    )
    visibility_timeout: float = Field(
        default=60.0, gt=0, description="Seconds a claimed entry may go without a heartbeat before reclaim."
    )
    max_deliveries: int = Field(
        default=5, ge=1, description="Deliveries of one entry before it goes to the dead-letter stream."
    )
    max_retries: int = Field(default=3, ge=0, description="Retries of a transient failure.")
    retry_backoff: float = Field(default=1.0, gt=0, description="First retry delay in seconds (doubles).")
    retry_backoff_max: float = Field(default=60.0, gt=0, description="Largest retry delay in seconds.")
    shutdown_grace: float = Field(default=30.0, ge=0, description="Seconds in-flight runs get to finish after SIGTERM.")
    results_maxlen: int = Field(
        default=1_000_000, ge=1000, description="Approximate retention of the results stream (entries)."
    )
    task_ttl: int = Field(default=7 * 24 * 3600, ge=60, description="Seconds a finished task's status stays in Redis.")
    retention_days: int = Field(
        default=30,
        ge=0,
        description="Days a finished execution, its chain of work and its dead letters are kept (0: for ever).",
    )
    cleanup_cron: str = Field(
        default="30 * * * *",
        description="When the built-in retention cleanup runs (cron; once per tick across all workers).",
    )
    cleanup_batch: int = Field(
        default=500, ge=1, le=10_000, description="Executions the retention cleanup deletes per transaction."
    )
    dead_letter_maxlen: int = Field(
        default=100_000,
        ge=1000,
        description="Approximate most entries each dead-letter stream keeps (the requests' and the projector's).",
    )
    projector_batch: int = Field(default=500, ge=1, description="Events the projector writes per batch.")
    run_projector: bool = Field(default=True, description="Run the PostgreSQL projector inside each worker.")
    results_linger_ms: int = Field(
        default=20,
        ge=0,
        le=1000,
        description="After a read of the results stream that found fewer events than it asked for, the "
        "projector and the webhook fan-out wait this long before their next read: a run's events are taken "
        "in a batch or two after its steps rather than one small batch per step in between (less CPU per "
        "event, and none of it in the run's way). 0: read again at once.",
    )

    default_executor: str = Field(default="local", description="Sandbox for nodes without `executor`.")
    e2b_template: str = Field(default="base", description="E2B template the e2b sandbox starts from.")
    e2b_sandbox_memory_mb: int = Field(
        default=512,
        ge=128,
        description="RAM of the E2B template's sandboxes; the node runner caps memory at 3/4 of it.",
    )
    e2b_lifetime_margin: float = Field(
        default=60.0, ge=0, description="Seconds an E2B sandbox outlives its execution's deadline."
    )
    e2b_max_lifetime: float = Field(
        default=3600.0, gt=0, description="Longest E2B sandbox lifetime the plan allows (Hobby 3600, Pro 86400)."
    )
    e2b_max_sandboxes: int = Field(
        default=20,
        ge=1,
        description="E2B sandboxes alive at once across all workers: the plan's limit (Hobby 20, Pro 100).",
    )
    e2b_creates_per_second: float = Field(
        default=0.9,
        ge=0,
        description="E2B sandbox creates per second across all workers: a tenth below the plan's (Hobby 1 -> 0.9, "
        "Pro 5 -> 4.5), so that network jitter does not bring two creates closer than E2B allows; 0: unpaced.",
    )
    e2b_rate_limit_wait: float = Field(
        default=1.0,
        gt=0,
        description="Seconds a run handed back for want of an E2B sandbox (every slot taken, or E2B answered "
        "429) waits in the delayed set before it tries again (no retry spent, no worker slot held).",
    )
    e2b_inline_wait: float = Field(
        default=2.0,
        ge=0,
        description="Longest a run waits for an E2B slot or create token while holding its worker slot; "
        "a longer wait hands the run back (cheaper than a hand-back only for short waits).",
    )
    e2b_fallback: Literal["local"] | None = Field(
        default=None,
        description="Where nodes with executor 'e2b' (or NOVA's cached/ai with code) run when E2B_API_KEY is "
        "unset: 'local' (the local sandbox; `nova dev` sets it), or unset: such a node fails its execution at once.",
    )
    sandbox_python: str | None = Field(
        default=None, description="Python interpreter for the local sandbox (default: this one)."
    )
    sandbox_pool_size: int = Field(default=2, ge=0, description="Pre-started local sandbox interpreters.")
    sandbox_launch: Literal["auto", "fork", "bwrap", "plain"] = Field(
        default="auto",
        description="How local sandboxes start: 'fork' (a pre-imported fork server per worker enters the "
        "namespaces, cgroup and uid itself), 'bwrap' (bubblewrap and a fresh interpreter per sandbox), 'auto' "
        "(fork where it can run, else bwrap), or 'plain' (forked without any isolation: for measurements).",
    )
    sandbox_network: Literal["egress", "none"] = Field(
        default="egress",
        description="Network of local sandboxes: 'none' (own network namespace, loopback only) or 'egress' "
        "(the internet; the host, private, shared and link-local ranges refused: see the README's Sandboxes section).",
    )
    sandbox_egress_allow: str = Field(
        default="",
        description="With network egress: comma-separated CIDRs of internal hosts local sandboxes may reach "
        "despite the filter (e.g. an internal API).",
    )
    sandbox_cpus: float = Field(default=1.0, gt=0, description="CPUs one local sandbox may use (cgroup quota).")
    sandbox_writable: str = Field(
        default="",
        description="Comma-separated host folders every local sandbox may write (bound read-write); none by "
        "default: everything but its own work folder and /tmp is read-only.",
    )
    sandbox_insecure: bool = Field(
        default=False,
        description="Let a worker whose local sandbox lacks a piece of isolation run nodes of more than one "
        "client (`nova dev` sets it).",
    )

    run_webhooks: bool = Field(default=True, description="Deliver webhooks from inside each worker.")
    webhook_group: str = Field(
        default="nova-webhooks", description="Consumer group that turns results-stream events into webhook deliveries."
    )
    webhook_allow: str = Field(
        default="",
        description="CIDRs or host names webhooks may reach although loopback, private, link-local or metadata "
        "addresses (comma-separated); empty: only public addresses.",
    )
    webhook_timeout: float = Field(default=10.0, gt=0, description="Seconds one webhook request may take.")
    webhook_retry_for: float = Field(
        default=86400.0, gt=0, description="Seconds a webhook delivery is retried before it is dead-lettered."
    )
    webhook_backoff: float = Field(default=5.0, gt=0, description="First webhook retry delay in seconds (doubles).")
    webhook_backoff_max: float = Field(default=1800.0, gt=0, description="Largest webhook retry delay in seconds.")
    webhook_secret_grace: float = Field(
        default=86400.0,
        ge=0,
        le=7 * 86400,
        description="Seconds a rotated webhook secret still signs beside the new one (a rotation may ask otherwise).",
    )
    webhook_endpoint_concurrency: int = Field(
        default=4, ge=1, description="Requests in flight to one webhook endpoint per process (worker or API)."
    )

    alert_check_interval: float = Field(
        default=15.0, gt=0, description="Seconds between the API's checks that workers are alive and keeping up."
    )
    alert_pending_age: float = Field(
        default=300.0, gt=0, description="Seconds a request may wait for a worker before the API raises an alert."
    )
    alert_repeat: float = Field(
        default=900.0, gt=0, description="Seconds before an alert still true is raised again (across API replicas)."
    )

    # TESTS ONLY, never set in a deployment: makes this code read entries of a format newer than the one
    # it writes (shared/streams.py FORMAT_VERSION), standing in for the next release's worker and
    # projector in the rolling-deploy tests. Left out of `nova --help` and the README.
    test_only_format_version: int = Field(
        default=0, ge=0, description="TESTS ONLY: read entries up to this format (a stand-in for a newer release)."
    )

    data_dir: str = Field(default=".nova", description="Where `nova dev` keeps embedded server data.")
    log_level: str = Field(default="INFO", description="Logging level.")

    @field_validator("e2b_fallback", mode="before")
    @classmethod
    def _no_fallback(cls, value: object) -> object:
        # An empty variable (a template's placeholder) means no fallback, as unset does.
        if isinstance(value, str):
            value = value.strip().lower()
            return None if value in {"", "none", "off"} else value
        return value

    @field_validator("lane_weights")
    @classmethod
    def _lane_weights(cls, value: str) -> str:
        parse_lane_weights(value)
        return value

    @field_validator("sandbox_egress_allow")
    @classmethod
    def _egress_allow(cls, value: str) -> str:
        for cidr in _cidrs(value):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"NOVA_SANDBOX_EGRESS_ALLOW: '{cidr}' is not an IP address or CIDR") from None
        return value

    @property
    def egress_allow_list(self) -> list[str]:
        """The CIDRs of NOVA_SANDBOX_EGRESS_ALLOW (checked at start)."""
        return _cidrs(self.sandbox_egress_allow)

    @property
    def lane_weight_map(self) -> dict[Lane, int]:
        return parse_lane_weights(self.lane_weights)

    @field_validator("cleanup_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        # The check POST /schedules makes: is_valid alone let `0 0 30 2 *` through, a cron no date
        # matches, and the workers' cleanup then never ran. Imported on use, as croniter was (~20 ms).
        from shared.cron import InvalidSchedule, validate_cron

        try:
            return validate_cron(value)
        except InvalidSchedule as exc:
            raise ValueError(f"NOVA_CLEANUP_CRON: {exc}") from None

    @property
    def cluster(self) -> bool:
        """Whether Redis is a cluster: said by NOVA_REDIS_CLUSTER or by the URL's scheme."""
        return self.redis_cluster or bool(self.redis_url and "+cluster://" in self.redis_url.split("@", 1)[0])

    @property
    def tagged(self) -> bool:
        """Whether key names carry hash tags: on a cluster, or with more than one shard. One shard on a
        single Redis keeps the documented names (`nova:requests`, `nova:task:<id>`)."""
        return self.cluster or self.shards > 1

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def readable_format(self) -> int:
        """The newest format of entries, events and task hashes this process reads (older ones too)."""
        return max(_format_version(), self.test_only_format_version)

    def new_consumer_name(self) -> str:
        """A consumer name unique to the caller, so that replicas share a group without colliding.

        Called once per worker or projector; a method, not a cached value, so that copies of the
        settings (tests run several workers in one process) never share a name by accident.
        """
        if self.consumer_name:
            return self.consumer_name
        return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _cidrs(value: str) -> list[str]:
    return [cidr.strip() for cidr in value.split(",") if cidr.strip()]


def describe_settings() -> str:
    """One line per setting, for `--help` epilogs."""
    lines = []
    for name, field in Settings.model_fields.items():
        if name.startswith("test_only_"):
            continue
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            env = str(alias.choices[0])
        else:
            env = f"NOVA_{name.upper()}"
        default = field.default
        shown = "unset" if default is None else repr(default)
        lines.append(f"{env} (default {shown}): {field.description}")
    return "\n".join(lines)
