"""Watching the fleet over MQTT: presence and telemetry as the boards send them.

Used by `fleet sim` for its live table (it works with any broker given by
--mqtt, NATS or not) and by the tests to wait for what boards do. Retained
status messages arrive on subscribe, so a late observer still sees who is
online.
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt

from fleet.protocol import mqtt_topic


@dataclass
class DeviceView:
    device_id: str
    online: bool | None = None
    status: dict[str, Any] = field(default_factory=dict)
    status_changes: list[tuple[float, bool]] = field(default_factory=list)
    readings: list[dict[str, Any]] = field(default_factory=list)
    last_seen: float | None = None
    malformed: int = 0
    dropped: int = 0
    batches: int = 0
    resent: int = 0  # readings seen again in a batch sent a second time

    @property
    def last_reading(self) -> dict[str, Any] | None:
        return self.readings[-1] if self.readings else None

    @property
    def seqs(self) -> list[int]:
        return [r["seq"] for r in self.readings if isinstance(r.get("seq"), int)]


class FleetObserver:
    """An MQTT client that keeps a DeviceView per device it hears from."""

    def __init__(self, host: str, port: int, client_id: str = "fleet-observer", keep_readings: int = 10_000):
        self.host = host
        self.port = port
        self.keep_readings = keep_readings
        self.devices: dict[str, DeviceView] = {}
        self.messages: list[tuple[float, str, bytes]] = []
        self._changed = threading.Condition()
        self._connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def start(self, timeout: float = 10.0) -> "FleetObserver":
        self.client.connect(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.stop()
            raise TimeoutError(f"observer could not connect to mqtt://{self.host}:{self.port}")
        return self

    def stop(self) -> None:
        self.client.loop_stop()
        try:
            self.client.disconnect()
        except Exception:
            pass

    def __enter__(self) -> "FleetObserver":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe([(mqtt_topic("+", "status"), 1), (mqtt_topic("+", "batch"), 1), (mqtt_topic("+", "pong"), 0)])
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        parts = message.topic.split("/")
        if len(parts) != 3:
            return
        _, device_id, kind = parts
        now = time.time()
        with self._changed:
            self.messages.append((now, message.topic, message.payload))
            view = self.devices.setdefault(device_id, DeviceView(device_id))
            try:
                payload = json.loads(message.payload)
            except ValueError:
                payload = None
            if kind == "status" and isinstance(payload, dict):
                view.status = payload
                view.online = bool(payload.get("online"))
                view.status_changes.append((now, view.online))
            elif kind == "batch" and isinstance(payload, dict) and isinstance(payload.get("records"), list):
                # Readings as the board forwards them from its flash log; a
                # batch sent again (no ack yet) shows its readings once.
                for record in payload["records"]:
                    if not isinstance(record, dict) or not isinstance(record.get("seq"), int):
                        view.malformed += 1
                    elif view.readings and record["seq"] <= view.readings[-1]["seq"]:
                        view.resent += 1
                    else:
                        view.readings.append(record)
                del view.readings[: -self.keep_readings]
                view.dropped = payload.get("dropped", 0)
                view.batches += 1
                view.last_seen = now
            elif kind != "pong":
                view.malformed += 1
            self._changed.notify_all()

    def device(self, device_id: str) -> DeviceView:
        with self._changed:
            return self.devices.setdefault(device_id, DeviceView(device_id))

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str = "condition") -> None:
        """Wait for `condition` (evaluated under the lock) to hold, at most `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not condition():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{what} not met within {timeout} s")
                self._changed.wait(min(left, 0.5))

    def ping(self, device_id: str, payload: bytes) -> None:
        self.client.publish(mqtt_topic(device_id, "ping"), payload, qos=0)
