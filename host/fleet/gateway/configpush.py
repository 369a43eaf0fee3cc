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

It also subscribes to the boards' config topics: a retained copy that is
cleared (an empty retained message) or that differs from the desired
configuration is replaced by the desired one; a copy with a newer version
is left alone (another gateway, further along in the bucket, sent it).

The MQTT connection is watched: a listener that cannot be reached or
refuses the gateway is logged as a warning naming it and why (again at most
every `warn_every` seconds while it lasts), and the state is kept in
`mqtt_connected`, `mqtt_error`, `mqtt_since` and `mqtt_address`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from fleet.broker.jetstream import device_stream
from fleet.state.config import ConfigStore, Effective, Level, config_bucket, levels_of, merge
from fleet.protocol import CONFIG_REPORTS_STREAM, DEVICES_BUCKET, is_valid_device_id, mqtt_topic, nats_subject
from fleet.wire import DeviceRecord

log = logging.getLogger(__name__)


def reports_stream_config() -> api.StreamConfig:
    return device_stream(
        CONFIG_REPORTS_STREAM,
        "what each device did with its configuration, the last few per device",
        "config/reported",
        max_msgs_per_subject=16,
    )


def _connect_failure(error: BaseException | None) -> str:
    # "connection refused", "timed out", "name or service not known".
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]
    if error is not None:
        return str(error) or type(error).__name__
    return "cannot connect"


class ConfigPublisher:
    def __init__(
        self,
        js: JetStreamContext,
        mqtt_host: str,
        mqtt_port: int,
        username: str | None = None,
        password: str | None = None,
        warn_every: float = 30.0,
    ) -> None:
        self.js = js
        self.mqtt_host = mqtt_host
        self.mqtt_port = mqtt_port
        self.username = username
        self.password = password
        self.warn_every = warn_every  # seconds between warnings while the listener stays unreachable
        self.levels: dict[str, Level] = {}
        self.groups: dict[str, list[str]] = {}  # device id -> groups
        self.published: dict[str, bytes] = {}  # device id -> last payload sent
        self.publishes = 0
        self.republished = 0  # retained copies found cleared or different, and replaced
        self.store: ConfigStore | None = None
        # The MQTT connection's state, read by the gateway's health endpoint.
        self.mqtt_address = f"[{mqtt_host}]:{mqtt_port}" if ":" in mqtt_host else f"{mqtt_host}:{mqtt_port}"
        self.mqtt_connected = False
        self.mqtt_error: str | None = "not connected yet"
        self.mqtt_since = time.time()  # unix time of the last change of mqtt_connected
        self.mqtt_failures = 0  # connection attempts that failed, since start
        self._warned_at: float | None = None  # monotonic time of the last warning
        self._said_down = False  # a warning was logged since the last "connected"
        self._ever_connected = False
        self._stopping = False
        self._client: mqtt.Client | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._republishing: set[asyncio.Task[None]] = set()
        self._watchers: dict[str, Any] = {}

    async def start(self) -> None:
        kv = await config_bucket(self.js)
        self.store = ConfigStore(kv)
        devices = await self.js.key_value(DEVICES_BUCKET)
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=f"fleet-gateway-config-{uuid.uuid4().hex[:8]}", clean_session=True
        )
        client.reconnect_delay_set(0.1, 5)
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        loop = asyncio.get_running_loop()

        def on_loop(callback: Any, *args: Any) -> None:
            try:
                loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:  # the loop is closed: the gateway is gone
                pass

        # paho's callbacks run on its network thread, one at a time.
        def connected(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            if reason.is_failure:
                # The broker closes the connection next; this says why.
                self._link_down(f"CONNACK refused: {str(reason).lower()}")
                return
            self._link_up()
            client.subscribe(mqtt_topic("+", "config"), qos=0)
            # (Re)connected: whatever could not be sent meanwhile goes now.
            on_loop(lambda: asyncio.ensure_future(self._publish_all()))

        def connect_failed(client: mqtt.Client, userdata: Any) -> None:
            # paho calls this from inside its `except OSError:` around the
            # connect, so the error being handled is the reason.
            self._link_down(_connect_failure(sys.exc_info()[1]))

        def disconnected(client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            if self.mqtt_connected and not self._stopping:
                self._link_down(f"connection lost: {str(reason).lower()}")

        def message(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            on_loop(self._check_copy, msg.topic, msg.payload)

        client.on_connect = connected
        client.on_connect_fail = connect_failed
        client.on_disconnect = disconnected
        client.on_message = message
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

    def _link_up(self) -> None:
        tell = not self._ever_connected or self._said_down
        self._ever_connected = True
        self._said_down = False
        self.mqtt_connected = True
        self.mqtt_error = None
        self.mqtt_since = time.time()
        if tell:
            log.info("connected to the MQTT listener at %s", self.mqtt_address)

    def _link_down(self, reason: str) -> None:
        if self.mqtt_connected:
            self.mqtt_since = time.time()
        self.mqtt_connected = False
        self.mqtt_error = reason
        self.mqtt_failures += 1
        now = time.monotonic()
        if self._warned_at is not None and now - self._warned_at < self.warn_every:
            return
        again = self._said_down
        self._warned_at = now
        self._said_down = True
        if again:
            log.warning(
                "still cannot reach the MQTT listener at %s (%s) after %.0f s; configuration and commands wait, retrying",
                self.mqtt_address, reason, time.time() - self.mqtt_since,
            )
        else:
            log.warning(
                "cannot reach the MQTT listener at %s (%s): configuration and commands wait until it answers; retrying",
                self.mqtt_address, reason,
            )

    def _check_copy(self, topic: str, payload: bytes) -> None:
        # What the broker holds (or just passed on) for a device's config
        # topic: put the desired configuration back when it is not that.
        parts = topic.split("/")
        device_id = parts[1] if len(parts) == 3 else ""
        if device_id not in self.groups:
            return  # not a known device: nothing of ours to put back
        effective = self.effective(device_id)
        if effective.version == 0 or payload == effective.payload():
            return  # nothing configured, or our own (echoed) copy
        if payload:
            try:
                version = json.loads(payload).get("version")
            except (ValueError, AttributeError, RecursionError):  # not JSON, not an object, nested too deep
                version = None
            if isinstance(version, int) and not isinstance(version, bool) and version > effective.version:
                return  # newer than ours: another gateway read the bucket first
        log.info(
            "config for %s: the retained copy was %s; publishing version %d again",
            device_id, "cleared" if not payload else "different", effective.version,
        )
        self.published.pop(device_id, None)
        self.republished += 1
        task = asyncio.ensure_future(self._publish(device_id))
        self._republishing.add(task)
        task.add_done_callback(self._republishing.discard)

    async def stop(self) -> None:
        self._stopping = True
        for task in [*self._tasks, *self._republishing]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._republishing, return_exceptions=True)
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
