"""Webhook endpoints: the registry, the events they subscribe to, signing, and the egress policy.

Kept in Redis next to the queue (the API registers, every worker's delivery loop reads):

- `{prefix}:webhooks` hash: endpoint id -> JSON (url, secret, event types, client scope).
- `{prefix}:webhooks:deliveries` hash: delivery id -> JSON (the body to send, attempts, last error).
- `{prefix}:webhooks:due` sorted set: delivery id scored by when it may next be sent (ms, Redis's clock).
- `{prefix}:webhooks:lease:{delivery id}` string: held while one process sends it.
- `{prefix}:webhooks:{endpoint id}:dead` list: deliveries that gave up, newest first (capped).
- `{prefix}:webhooks:previous` hash: endpoint id -> its previous secret and when it stops signing
  (ms), after a rotation. Kept beside the record, not in it, so the record keeps its shape.

A delivery id is also its `webhook-id` header: `msg_{endpoint id}_{results-stream entry id}`, the same
for every attempt and replay, so a receiver drops duplicates by it. Signatures follow the Standard
Webhooks convention through its reference library (`standardwebhooks`).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import secrets
import socket
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from standardwebhooks import Webhook

from shared.clients import ClientError, Vault
from shared.connections import redis_ms
from shared.events import Event
from shared.reporting import active_sentry
from shared.scripts import Scripts
from shared.settings import Settings
from shared.streams import EventType, Keys, Layout, dumps, loads, now_iso
from shared.webhook_events import WebhookEvent

# Dead deliveries kept per endpoint: enough for an operator to replay an outage's worth, bounded so a
# dead endpoint cannot grow Redis without limit.
DEAD_LETTERS_KEPT = 1000
RESOLVE_TIMEOUT = 5.0
SEALED = "sealed:"


class InvalidEndpoint(ValueError):
    """A registration that cannot be made as asked (said in words for a 422 or the CLI)."""


def endpoint_event_types(requested: list[str] | None, client: str | None) -> list[str]:
    """The event types an endpoint is registered for: `requested`, or every type when None.

    A client's endpoint receives its own executions only: `workers.unavailable` (the operators'
    concern) is left out of its default, and refused when asked for by name."""
    try:
        types = set(WebhookEvent) if requested is None else {WebhookEvent(t) for t in requested}
    except ValueError:
        unknown = sorted(set(requested or []) - {e.value for e in WebhookEvent})
        known = ", ".join(e.value for e in WebhookEvent)
        raise InvalidEndpoint(f"unknown event type(s) {', '.join(unknown)}; known: {known}") from None
    if client is not None:
        if requested is not None and WebhookEvent.WORKERS_UNAVAILABLE in types:
            raise InvalidEndpoint("workers.unavailable is for operators' endpoints (no client_slug)")
        types.discard(WebhookEvent.WORKERS_UNAVAILABLE)
    if not types:
        raise InvalidEndpoint("event_types must name at least one event type")
    return sorted(t.value for t in types)


# The event types webhook_event may turn into a webhook (node_finished only when it failed): a reader
# can pass over the others without parsing them.
ANNOUNCED_TYPES = frozenset(
    t.value for t in (EventType.SUCCEEDED, EventType.FAILED, EventType.DEAD, EventType.NODE_FINISHED)
)


def webhook_event(event: Event) -> WebhookEvent | None:
    """The webhook type a results-stream event is, if any."""
    if event.type is EventType.SUCCEEDED:
        return WebhookEvent.EXECUTION_SUCCEEDED
    if event.type is EventType.FAILED:
        return WebhookEvent.EXECUTION_FAILED
    if event.type is EventType.DEAD:
        return WebhookEvent.EXECUTION_DEAD
    if event.type is EventType.NODE_FINISHED and event.data.get("status") in ("failure", "failed"):
        return WebhookEvent.NODE_FAILED
    return None


def payload(kind: WebhookEvent, event: Event) -> str:
    """The body sent for `event`: Standard Webhooks' {type, timestamp, data}.

    Events on the results stream are already masked by the run (credentials removed, secrets as ***),
    so the body holds nothing a client's run did not already show.
    """
    return dumps(
        {
            "type": kind.value,
            "timestamp": event.ts,
            "data": {
                "event_id": event.id,
                "task_id": event.task_id,
                "execution_id": event.execution_id,
                "workflow_id": event.workflow_id,
                "client_slug": event.client,
                **event.data,
            },
        }
    )


class WebhookKeys:
    # Under `keys.home`: on a cluster they share one slot, as the transactions writing them need.
    def __init__(self, keys: Keys) -> None:
        self.prefix = keys.home
        self.endpoints = f"{self.prefix}:webhooks"
        self.deliveries = f"{self.prefix}:webhooks:deliveries"
        self.due = f"{self.prefix}:webhooks:due"
        self.previous = f"{self.prefix}:webhooks:previous"

    def lease(self, delivery_id: str) -> str:
        return f"{self.prefix}:webhooks:lease:{delivery_id}"

    def dead(self, endpoint_id: str) -> str:
        return f"{self.prefix}:webhooks:{endpoint_id}:dead"


def delivery_id(endpoint_id: str, entry_id: str) -> str:
    return f"msg_{endpoint_id}_{entry_id}"


def endpoint_of(delivery: str) -> str:
    return delivery.split("_", 2)[1]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(signing: str | list[str], msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The three Standard Webhooks headers for one attempt, signed with each secret given (the current
    one first; during a rotation's grace also the previous): Standard Webhooks lists several
    signatures in one header, space-separated, and a receiver accepts the message if any matches."""
    moment = datetime.fromtimestamp(timestamp, UTC)
    keys = [signing] if isinstance(signing, str) else signing
    signature = " ".join(Webhook(secret).sign(msg_id, moment, body) for secret in keys)
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


# ---- egress policy --------------------------------------------------------------------------------


class EgressRefused(ValueError):
    """A URL the delivery loop may not call (scheme, unresolvable host, or a non-public address)."""


@dataclass(frozen=True)
class EgressPolicy:
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> EgressPolicy:
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        hosts: set[str] = set()
        for item in (part.strip() for part in settings.webhook_allow.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(tuple(networks), frozenset(hosts))

    def permits(self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if host.lower().rstrip(".") in self.hosts or any(address in net for net in self.networks):
            return True
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        # Only global unicast addresses: this refuses loopback, private ranges, link-local (and with it
        # the cloud metadata address 169.254.169.254), shared CGNAT space, ULA and reserved ranges.
        return address.is_global and not address.is_multicast

    async def resolve(self, url: str, timeout: float = RESOLVE_TIMEOUT) -> tuple[str, str]:
        """(host, address) to connect to for `url`, or EgressRefused saying why.

        The caller connects to the address it was given (not the name again), so a DNS answer that
        changes between the check and the connection cannot point the request inside.
        """
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            # Found by the schema fuzz test: a malformed host (e.g. "http://[::1") used to end in a 500.
            raise EgressRefused(f"the URL is malformed: {exc}") from None
        try:
            # The sender builds its request with httpx.URL, which refuses more than urlsplit does (control
            # characters, a host that is not valid IDNA, a URL too long): such a URL was registered, then
            # no attempt to it could be made. Checked here, it is refused at registration (a 422), and an
            # endpoint stored before this check fails each attempt with the reason, as any refusal does.
            httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise EgressRefused(f"the URL is malformed: {exc}") from None
        if parts.scheme not in ("http", "https") or not host:
            raise EgressRefused("the URL must be http:// or https:// with a host")
        port = port or (443 if parts.scheme == "https" else 80)
        try:
            # Bounded: a resolver that does not answer must not hold a registration or a delivery slot.
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout
            )
        except (OSError, UnicodeError, ValueError, TimeoutError) as exc:
            raise EgressRefused(f"cannot resolve {host}: {exc or 'no answer'}") from None
        refused: list[str] = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
            if self.permits(host, address):
                return host, str(address)
            refused.append(str(address))
        raise EgressRefused(
            f"{host} resolves to a loopback, private, link-local or metadata address ({', '.join(refused)}); "
            "an operator may allow it with NOVA_WEBHOOK_ALLOW"
        )


# ---- the registry ---------------------------------------------------------------------------------


@dataclass
class Endpoint:
    id: str
    url: str
    secret: str
    event_types: list[str]
    # None: the operator's endpoint, every execution; else only that client's executions.
    client: str | None = None
    description: str | None = None
    created_at: str = ""

    def wants(self, kind: WebhookEvent, event: Event) -> bool:
        return kind.value in self.event_types and (self.client is None or self.client == event.client)

    def as_json(self, *, with_secret: bool = False) -> dict[str, Any]:
        data = asdict(self)
        data["client_slug"] = data.pop("client")
        if not with_secret:
            data.pop("secret")
        return data


@dataclass
class Delivery:
    id: str
    endpoint_id: str
    type: str
    body: str
    first_at_ms: int
    attempts: int = 0
    last_error: str | None = None
    last_status: int | None = None
    dead_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> str:
        return dumps(asdict(self))

    @classmethod
    def decode(cls, raw: str) -> Delivery:
        return cls(**loads(raw))

    def as_json(self, state: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": state,
            "type": self.type,
            "attempts": self.attempts,
            "last_error": self.last_error,
            "last_status": self.last_status,
            "first_attempt_at": datetime.fromtimestamp(self.first_at_ms / 1000, UTC).isoformat(),
            "dead_at": self.dead_at,
            "payload": loads(self.body),
        }


class RotationConflict(Exception):
    """The endpoint changed (another rotation) or went while its secret was being rotated."""


@dataclass
class Rotated:
    endpoint: Endpoint
    # When the previous secret stops signing (ms, Redis's clock); None: it stopped at once.
    previous_until_ms: int | None

    def as_json(self) -> dict[str, Any]:
        until = self.previous_until_ms
        return {
            "id": self.endpoint.id,
            "secret": self.endpoint.secret,
            "previous_secret_expires_at": datetime.fromtimestamp(until / 1000, UTC).isoformat() if until else None,
        }


class WebhookRegistry:
    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.names = WebhookKeys(keys)
        self.vault = Vault.from_settings(settings)

    def _dump(self, endpoint: Endpoint) -> str:
        data = asdict(endpoint)
        data["secret"] = self._seal(endpoint.secret)
        return dumps(data)

    def _seal(self, secret: str) -> str:
        # At rest under NOVA_SECRETS_KEY when there is one, as client credentials are.
        return SEALED + self.vault.encrypt(secret) if self.vault.has_key else secret

    def _unseal(self, secret: str) -> str:
        if not secret.startswith(SEALED):
            return secret
        try:
            return self.vault.decrypt(secret[len(SEALED) :])
        except ClientError:
            return ""  # unreadable here: deliveries fail (and say so) rather than go unsigned

    def _load(self, raw: str) -> Endpoint:
        endpoint = Endpoint(**loads(raw))
        endpoint.secret = self._unseal(endpoint.secret)
        return endpoint

    async def ensure_group(self) -> None:
        """The delivery group, created at '$': endpoints receive events from their registration on.

        Created by the first registration as well as by workers, so events between a registration and
        the first worker's start are not skipped.
        """
        for keys in Layout.from_settings(self.settings).shards:
            try:
                await self.redis.xgroup_create(keys.results, self.settings.webhook_group, id="$", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def create(
        self, url: str, event_types: list[str], client: str | None, description: str | None = None
    ) -> Endpoint:
        await EgressPolicy.from_settings(self.settings).resolve(url)
        endpoint = Endpoint(
            id=uuid.uuid4().hex[:16],
            url=url,
            secret=new_secret(),
            event_types=sorted(set(event_types)),
            client=client,
            description=description,
            created_at=now_iso(),
        )
        await self.ensure_group()
        await self.redis.hset(self.names.endpoints, endpoint.id, self._dump(endpoint))
        return endpoint

    async def get(self, endpoint_id: str) -> Endpoint | None:
        raw = await self.redis.hget(self.names.endpoints, endpoint_id)
        return self._load(raw) if raw else None

    async def list(self) -> list[Endpoint]:
        raw = await self.redis.hgetall(self.names.endpoints)
        endpoints = [self._load(value) for value in raw.values()]
        return sorted(endpoints, key=lambda e: (e.created_at, e.id))

    async def delete(self, endpoint_id: str) -> bool:
        # Its deliveries still due are dropped by the delivery loop when it finds no endpoint.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hdel(self.names.endpoints, endpoint_id)
            pipe.delete(self.names.dead(endpoint_id))
            pipe.hdel(self.names.previous, endpoint_id)
            removed, _, _ = await pipe.execute()
        return bool(removed)

    async def rotate_secret(self, endpoint_id: str, grace: float) -> Rotated | None:
        """Give the endpoint a new secret; the old one goes on signing beside it for `grace` seconds
        (one previous secret at a time: a rotation within the grace drops the one before). None: no
        such endpoint; RotationConflict: it changed or went meanwhile (nothing written)."""
        raw = await self.redis.hget(self.names.endpoints, endpoint_id)
        if raw is None:
            return None
        endpoint = self._load(raw)
        old = endpoint.secret
        endpoint.secret = new_secret()
        until: int | None = None
        previous = ""
        if grace > 0 and old:
            until = await redis_ms(self.redis) + int(grace * 1000)
            previous = dumps({"secret": self._seal(old), "until_ms": until})
        replaced = await Scripts(self.redis, self.keys).rotate_secret(
            self.names.endpoints,
            self.names.previous,
            endpoint_id=endpoint_id,
            expected=raw,
            record=self._dump(endpoint),
            previous=previous,
        )
        if not replaced:
            raise RotationConflict(f"webhook {endpoint_id} changed while its secret was rotated; try again")
        return Rotated(endpoint, until)

    async def signing_secrets(self, endpoint: Endpoint, now_ms: int) -> list[str]:
        """The secrets an attempt is signed with now: the current one, and a rotated one in its grace."""
        signing = [endpoint.secret]
        raw = await self.redis.hget(self.names.previous, endpoint.id)
        if raw:
            previous = loads(raw)
            old = self._unseal(previous["secret"])
            if old and now_ms < int(previous["until_ms"]):
                signing.append(old)
        return signing

    async def announce(self, kind: WebhookEvent, data: dict[str, Any], occurrence: str, client: str | None) -> int:
        """Queue `kind` for every endpoint that wants it and may see it: operators' endpoints, and when
        `client` is given that client's own. `occurrence` names this happening (the same one announced
        twice makes one delivery). Returns how many deliveries were queued."""
        now_ms = await redis_ms(self.redis)
        body = dumps({"type": kind.value, "timestamp": now_iso(), "data": data})
        queued = 0
        async with self.redis.pipeline(transaction=True) as pipe:
            for endpoint in await self.list():
                if kind.value not in endpoint.event_types or endpoint.client not in (None, client):
                    continue
                delivery = Delivery(delivery_id(endpoint.id, occurrence), endpoint.id, kind.value, body, now_ms)
                pipe.hsetnx(self.names.deliveries, delivery.id, delivery.encode())
                pipe.zadd(self.names.due, {delivery.id: now_ms}, nx=True)
                queued += 1
            await pipe.execute()
        return queued

    async def deliveries(self, endpoint_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """Deliveries still being retried, then dead ones (newest first)."""
        items: list[dict[str, Any]] = []
        async for _, raw in self.redis.hscan_iter(self.names.deliveries, match=f"msg_{endpoint_id}_*"):
            items.append(Delivery.decode(raw).as_json("retrying"))
            if len(items) >= limit:
                break
        room = limit - len(items)
        if room <= 0:
            # LRANGE's stop is inclusive and -1 means the end: asked for no item it would answer the whole
            # list (up to DEAD_LETTERS_KEPT), so a full page of retrying ones reads no dead one at all.
            return items
        dead = await self.redis.lrange(self.names.dead(endpoint_id), 0, room - 1)
        items.extend(Delivery.decode(raw).as_json("dead") for raw in dead)
        return items

    async def replay(self, endpoint_id: str, delivery: str) -> bool:
        """Move a dead delivery back to be sent now, with a fresh retry budget."""
        key = self.names.dead(endpoint_id)
        for raw in await self.redis.lrange(key, 0, -1):
            parked = Delivery.decode(raw)
            if parked.id != delivery:
                continue
            now_ms = await redis_ms(self.redis)
            revived = Delivery(parked.id, parked.endpoint_id, parked.type, parked.body, first_at_ms=now_ms)
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.lrem(key, 1, raw)
                pipe.hset(self.names.deliveries, revived.id, revived.encode())
                pipe.zadd(self.names.due, {revived.id: now_ms})
                removed, _, _ = await pipe.execute()
            return bool(removed)
        return False


async def announce_schedule_failure(settings: Settings, redis: Redis, schedule: Any, tick_ms: int, reason: str) -> None:
    """A schedule's tick that could not fire: a `schedule.failed` webhook (operators' endpoints and the
    schedule's client's) and, with SENTRY_DSN, a Sentry event."""
    data = {
        "schedule_id": schedule.id,
        "workflow_id": schedule.workflow_id,
        "client_slug": schedule.client,
        "tick_ms": tick_ms,
        "reason": reason,
    }
    registry = WebhookRegistry(redis, Keys.from_settings(settings), settings)
    await registry.announce(WebhookEvent.SCHEDULE_FAILED, data, f"schedule-{schedule.id}-{tick_ms}", schedule.client)
    sentry_sdk = active_sentry()
    if sentry_sdk is not None:
        with sentry_sdk.new_scope() as scope:
            scope.set_tag("client", schedule.client)
            scope.set_tag("schedule_id", schedule.id)
            scope.set_tag("workflow_id", str(schedule.workflow_id))
            scope.fingerprint = ["nova-schedule", schedule.id, reason]
            sentry_sdk.capture_message(f"Schedule {schedule.id} could not fire: {reason}", level="error")
