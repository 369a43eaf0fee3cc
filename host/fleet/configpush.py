"""The gateway's configuration publisher: each device's effective
configuration as a retained QoS 1 MQTT message on fleet/<id>/config.

Through the MQTT listener, not a NATS publish: nats-server keeps a retained
MQTT message and delivers it to a device when it subscribes, so a device
that was offline gets the latest on reconnect, and several changes made
while it was away arrive as just the latest. A NATS publish is neither
retained nor queued for an offline MQTT session.

The publisher watches two buckets: `fleet_config` (the levels) and
`fleet_devices` (which devices exist and their groups, from their birth
messages). Any change recomputes the affected devices and publishes those
whose effective configuration changed. Running it in several gateways at
once is harmless: they publish the same retained message.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from .config import ConfigStore, Effective, Level, config_bucket, levels_of, merge
from .protocol import CONFIG_REPORTS_STREAM, DEVICES_BUCKET, is_valid_device_id, mqtt_topic, nats_subject
from .wire import DeviceRecord

log = logging.getLogger(__name__)


def reports_stream_config() -> api.StreamConfig:
    return api.StreamConfig(
        name=CONFIG_REPORTS_STREAM,
        description="what each device did with its configuration, the last few per device",
        subjects=[nats_subject("*", "config/reported")],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        max_msgs_per_subject=16,
    )


class ConfigPublisher:
    def __init__(self, js: JetStreamContext, mqtt_host: str, mqtt_port: int) -> None:
        self.js = js
        self.mqtt_host = mqtt_host
        self.mqtt_port = mqtt_port
        self.levels: dict[str, Level] = {}
        self.groups: dict[str, list[str]] = {}  # device id -> groups
        self.published: dict[str, bytes] = {}  # device id -> last payload sent
        self.publishes = 0
        self.store: ConfigStore | None = None
        self._client: mqtt.Client | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watchers: dict[str, Any] = {}

    async def start(self) -> None:
        kv = await config_bucket(self.js)
        self.store = ConfigStore(kv)
        devices = await self.js.key_value(DEVICES_BUCKET)
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleet-gateway-config-{uuid.uuid4().hex[:8]}", clean_session=True
        )
        client.reconnect_delay_set(0.1, 5)
        loop = asyncio.get_running_loop()

        def connected(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            if not reason.is_failure:
                # (Re)connected: whatever could not be sent meanwhile goes now.
                loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._publish_all()))

        client.on_connect = connected
        # In the background, retried: a broker without its MQTT listener up
        # yet must not stop the rest of the gateway.
        client.connect_async(self.mqtt_host, self.mqtt_port, 30)
        client.loop_start()
        self._client = client
        self._tasks = [
            asyncio.create_task(self._watch(kv, "levels", self._on_level), name="fleet-config-levels"),
            asyncio.create_task(self._watch(devices, "devices", self._on_device), name="fleet-config-devices"),
        ]

    @property
    def client(self) -> mqtt.Client | None:
        """The gateway's MQTT connection (also used to send commands)."""
        return self._client

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for watcher in self._watchers.values():
            try:
                await watcher.stop()  # its consumer's own tasks end with it
            except Exception as error:
                log.debug("stopping a watcher: %s", error)
        if self._client is not None:
            client = self._client
            self._client = None
            await asyncio.to_thread(client.disconnect)
            client.loop_stop()

    async def _watch(self, kv: KeyValue, what: str, handle: Any) -> None:
        while True:
            try:
                watcher = self._watchers[what] = await kv.watchall()
                async for entry in watcher:
                    if entry is None:
                        continue  # the end of what was stored: live updates follow
                    await handle(entry)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # connection trouble: watch again from the start
                log.warning("config publisher: watching the %s failed (%s); again in 1 s", what, error)
                await asyncio.sleep(1)

    async def _on_level(self, entry: Any) -> None:
        key = entry.key
        if entry.operation is not None:  # deleted or purged: that level no longer counts
            self.levels.pop(key, None)
        else:
            try:
                values = json.loads(entry.value or b"{}")
            except ValueError:
                log.warning("config level %s is not JSON; ignored", key)
                return
            self.levels[key] = Level(key, values if isinstance(values, dict) else {}, entry.revision or 0)
        kind, _, name = key.partition(".")
        if kind == "device":
            targets = [name] if name in self.groups else []
        elif kind == "group":
            targets = [d for d, groups in self.groups.items() if name in groups]
        else:
            targets = list(self.groups)
        for device_id in targets:
            await self._publish(device_id)

    async def _on_device(self, entry: Any) -> None:
        if entry.operation is not None or not is_valid_device_id(entry.key):
            return
        try:
            record = DeviceRecord.from_json(entry.value or b"")
        except ValueError:
            return
        known = self.groups.get(record.id)
        self.groups[record.id] = list(record.groups)
        if known != self.groups[record.id] or record.id not in self.published:
            await self._publish(record.id)

    def effective(self, device_id: str) -> Effective:
        keys = levels_of(device_id, self.groups.get(device_id, []))
        return merge([self.levels[key] for key in keys if key in self.levels])

    async def _publish_all(self) -> None:
        for device_id in list(self.groups):
            await self._publish(device_id)

    async def _publish(self, device_id: str) -> None:
        effective = self.effective(device_id)
        if effective.version == 0:
            return  # nothing configured for this device: its defaults stand
        payload = effective.payload()
        client = self._client
        if self.published.get(device_id) == payload or client is None or not client.is_connected():
            return  # sent already, or sent by _publish_all once connected
        info = client.publish(mqtt_topic(device_id, "config"), payload, qos=1, retain=True)
        try:
            await asyncio.to_thread(info.wait_for_publish, 10)
        except (RuntimeError, ValueError) as error:  # the connection went meanwhile
            log.warning("config for %s not published yet (%s); again on reconnect", device_id, error)
            return
        if not info.is_published():
            log.warning("config for %s: no PUBACK in 10 s; again on reconnect", device_id)
            return
        self.published[device_id] = payload
        self.publishes += 1
        log.info("config version %d published for %s", effective.version, device_id)


__all__ = ["ConfigPublisher", "reports_stream_config"]
