"""Remote commands, host side: a durable record per command and device in
the KV bucket `fleet_commands`, delivery over MQTT QoS 1, state from the
boards' results.

States: queued (recorded, not yet handed to the broker), sent (published
QoS 1 into the device's persistent session: an offline board gets it on
reconnect), delivered (the board has it and is running it), and the final
succeeded, failed, rejected, expired. Each change is kept with its time.

`fleet cmd send` only writes records; the gateway (CommandRelay) publishes
queued ones, folds the results from the stream FLEET_COMMAND_RESULTS into
the records and marks commands whose TTL ran out as expired. The board
checks the expiry too (its clock: NTP on boards, the host's in the sim),
so a command that reaches it late is never run.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from fleet.errors import UsageError
from fleet.broker.jetstream import bucket_keys, device_stream, ensure_bucket, quietly
from fleet.protocol import COMMANDS_BUCKET, COMMAND_RESULTS_STREAM, is_valid_device_id, mqtt_topic, nats_subject

log = logging.getLogger(__name__)

FINAL = ("succeeded", "failed", "rejected", "expired")
ORDER = {"queued": 0, "sent": 1, "delivered": 2, "succeeded": 3, "failed": 3, "rejected": 3, "expired": 3}
RESULTS_CONSUMER = "fleet-gateway-command-results"


class CommandError(UsageError):
    """A bad command request; args[0] says why."""


@dataclass
class CommandRecord:
    id: str
    device: str
    name: str
    args: dict[str, Any]
    created: float
    expires: float | None
    state: str = "queued"
    result: Any = None
    error: str | None = None
    history: list[list[Any]] = field(default_factory=list)  # [state, unix time]

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def advance(self, state: str, at: float, result: Any = None, error: str | None = None) -> bool:
        """Move forward (never back, never out of a final state); True if changed."""
        if self.final or ORDER.get(state, -1) <= ORDER[self.state]:
            return False
        self.state = state
        self.history.append([state, at])
        if state == "succeeded":
            self.result = result
        elif state in FINAL:
            self.error = error
        return True

    def payload(self) -> bytes:
        """What the board receives on fleet/<id>/cmd."""
        return json.dumps({"id": self.id, "name": self.name, "args": self.args, "expires": self.expires}).encode()

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> CommandRecord:
        return cls(**json.loads(data))


def parse_duration(text: str) -> float:
    """'30s', '5m', '2h', '1d' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise CommandError(f"{text!r} is not a duration (like 30s, 5m, 2h, 1d)") from None


def parse_args(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError as error:
        raise CommandError(f"ARGS must be a JSON object: {error}") from None
    if not isinstance(value, dict):
        raise CommandError("ARGS must be a JSON object")
    return value


async def commands_bucket(js: JetStreamContext) -> KeyValue:
    return await ensure_bucket(js, COMMANDS_BUCKET, "one record per command and device")


class CommandStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def create(self, device: str, name: str, args: dict[str, Any], ttl: float | None) -> CommandRecord:
        if not is_valid_device_id(device):
            raise CommandError(f"invalid device id {device!r}")
        if not name or len(name) > 32:
            raise CommandError("a command name is 1 to 32 characters")
        now = time.time()
        record = CommandRecord(
            id="c" + uuid.uuid4().hex[:15], device=device, name=name, args=args, created=now,
            expires=now + ttl if ttl is not None else None, history=[["queued", now]],
        )
        await self.kv.create(record.id, record.to_bytes())
        return record

    async def get(self, command_id: str) -> tuple[CommandRecord, int]:
        entry = await self.kv.get(command_id)
        return CommandRecord.from_bytes(entry.value or b"{}"), entry.revision or 0

    async def update(self, command_id: str, change: Any) -> CommandRecord | None:
        """Apply change(record) -> bool with compare-and-set; the record, or None if unknown."""
        for _ in range(50):
            try:
                record, revision = await self.get(command_id)
            except KeyNotFoundError:
                return None
            if not change(record):
                return record
            try:
                await self.kv.update(command_id, record.to_bytes(), last=revision)
                return record
            except KeyWrongLastSequenceError:
                continue
        raise RuntimeError(f"command {command_id}: too many concurrent writes")

    async def all(self) -> list[CommandRecord]:
        keys = await bucket_keys(self.kv)
        records = []
        for key in keys:
            try:
                records.append((await self.get(key))[0])
            except (KeyNotFoundError, ValueError, TypeError):
                continue
        return sorted(records, key=lambda r: r.created)


def results_stream_config() -> api.StreamConfig:
    return device_stream(COMMAND_RESULTS_STREAM, "the boards' command results", "cmd/result", max_age=7 * 24 * 3600.0)


class CommandRelay:
    """Runs inside the gateway: publish queued commands, fold results, expire."""

    def __init__(self, js: JetStreamContext, client: mqtt.Client, sweep_every: float = 0.5) -> None:
        self.js = js
        self.client = client
        self.sweep_every = sweep_every
        self.store: CommandStore | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.store = CommandStore(await commands_bucket(self.js))
        subscription = await self.js.pull_subscribe(
            nats_subject("*", "cmd/result"), durable=RESULTS_CONSUMER, stream=COMMAND_RESULTS_STREAM,
            config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, deliver_policy=api.DeliverPolicy.ALL),
        )
        self._tasks = [
            asyncio.create_task(self._results(subscription), name="fleet-command-results"),
            asyncio.create_task(self._sweep(), name="fleet-command-sweep"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _sweep(self) -> None:
        # Publish what is queued, expire what ran out. A scan, not a watch:
        # simple, and the bucket only holds commands.
        while True:
            try:
                await self._sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("commands: sweep failed (%s)", error)
            await asyncio.sleep(self.sweep_every)

    async def _sweep_once(self) -> None:
        assert self.store is not None
        now = time.time()
        for record in await self.store.all():
            if record.final:
                continue
            if record.expires is not None and now > record.expires and record.state in ("queued", "sent"):
                await self.store.update(record.id, lambda r: r.advance("expired", now, error="the TTL ran out before the board ran it"))
            elif record.state == "queued" and self.client.is_connected():
                info = self.client.publish(mqtt_topic(record.device, "cmd"), record.payload(), qos=1)
                await asyncio.to_thread(info.wait_for_publish, 10)
                if info.is_published():
                    await self.store.update(record.id, lambda r: r.advance("sent", time.time()))

    async def _results(self, subscription: JetStreamContext.PullSubscription) -> None:
        assert self.store is not None
        while True:
            try:
                messages = await subscription.fetch(64, timeout=1.0)
            except asyncio.TimeoutError:
                continue
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("commands: fetch of results failed (%s)", error)
                await asyncio.sleep(1)
                continue
            for message in messages:
                await self._fold(message)

    async def _fold(self, message: Msg) -> None:
        assert self.store is not None
        try:
            result = json.loads(message.data)
            command_id, status = result["id"], result["status"]
        except (ValueError, KeyError, TypeError):
            await quietly(message.ack())  # nothing to update: a malformed result or a rejection without id
            return
        if isinstance(command_id, str) and status in ORDER:
            at = message.metadata.timestamp.timestamp()
            await self.store.update(
                command_id, lambda r: r.advance(status, at, result.get("result"), result.get("error"))
            )
        await quietly(message.ack())


__all__ = [
    "CommandError",
    "CommandRecord",
    "CommandRelay",
    "CommandStore",
    "FINAL",
    "commands_bucket",
    "parse_args",
    "parse_duration",
    "results_stream_config",
]
