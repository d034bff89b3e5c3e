"""The dead man's switch, run by the API (not by the workers, which may be the problem): when no worker
is alive in the group or requests wait longer than `NOVA_ALERT_PENDING_AGE`, an alert goes to Sentry
(with SENTRY_DSN) and, as a `workers.unavailable` webhook, to the operators' endpoints that want it.

Each API process checks every `NOVA_ALERT_CHECK_INTERVAL`; a key set with NX (`{prefix}:alerts:{reason}`,
expiring after `NOVA_ALERT_REPEAT`) makes one alert per reason and interval, however many API replicas
there are. The API also sends due webhook deliveries itself, so the alert leaves while no worker runs. No worker
is said to be missing before the API has watched for one visibility timeout.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.asyncio import Redis

from consumer.webhooks import WebhookDelivery
from shared.alerts import Alert, check_workers
from shared.backoff import sleep_or_stop
from shared.connections import REDIS_UNAVAILABLE, redis_ms
from shared.reporting import active_sentry
from shared.settings import Settings
from shared.streams import Keys, now_iso
from shared.webhooks import WebhookEvent, WebhookKeys, WebhookRegistry

log = logging.getLogger(__name__)


class WorkerWatch:
    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys.from_settings(settings)
        self.registry = WebhookRegistry(redis, self.keys, settings)
        self.names = WebhookKeys(self.keys)
        # A worker is live if it read or heartbeat within the visibility timeout: until this API has
        # watched that long, workers starting beside it (a fresh install, a deploy) are not yet missing.
        self._quiet_until = time.monotonic() + settings.visibility_timeout

    async def run(self, stop: asyncio.Event) -> None:
        # Deliveries (alerts among them) go out from the API as well: the workers may be what is down.
        sender = WebhookDelivery(self.settings, self.redis, consumer=f"api-{self.settings.new_consumer_name()}")
        await asyncio.gather(self._checks(stop), sender.run(stop, fan_out=False))

    async def _checks(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.check_once()
            except REDIS_UNAVAILABLE as exc:
                log.warning("worker watch: Redis unavailable (%s)", exc)
            except Exception:
                log.exception("worker watch: unexpected error; going on")
            await sleep_or_stop(self.settings.alert_check_interval, stop)

    async def check_once(self) -> list[Alert]:
        """Check, and raise the alerts not raised within the repeat interval; returns those raised."""
        raised = []
        for alert in await check_workers(self.redis, self.keys, self.settings):
            if alert.reason == "no_live_worker" and time.monotonic() < self._quiet_until:
                continue
            key = f"{self.keys.prefix}:alerts:{alert.reason}"
            if await self.redis.set(key, now_iso(), nx=True, ex=max(int(self.settings.alert_repeat), 1)):
                await self.raise_alert(alert)
                raised.append(alert)
        return raised

    async def raise_alert(self, alert: Alert) -> None:
        log.error("ALERT %s: %s", alert.reason, alert.message)
        sentry_sdk = active_sentry()
        if sentry_sdk is not None:
            with sentry_sdk.new_scope() as scope:
                scope.set_tag("alert", alert.reason)
                scope.fingerprint = ["nova-alert", alert.reason]
                scope.set_context("alert", alert.details)
                sentry_sdk.capture_message(f"NOVA workers: {alert.message}", level="fatal")
        now_ms = await redis_ms(self.redis)
        data = {"reason": alert.reason, "message": alert.message, **alert.details}
        # client None: operators' endpoints only.
        await self.registry.announce(WebhookEvent.WORKERS_UNAVAILABLE, data, f"alert-{alert.reason}-{now_ms}", None)
