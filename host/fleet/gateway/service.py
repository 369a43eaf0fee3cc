"""The gateway: from the boards' MQTT topics to a device registry and the fleet API.

The boards publish MQTT to nats-server's MQTT listener, which turns every
publish into a NATS message on fleet.<id>.<topic>. JetStream streams capture
those subjects by themselves (FLEET_PRESENCE, and FLEET_BATCHES for the
readings), so nothing is lost while no gateway runs. The gateway:

- creates or updates the streams and the `fleet_devices` KV bucket;
- reads FLEET_PRESENCE through a durable pull consumer shared by every
  gateway instance, folds each fetched batch into one record per device and
  writes it with optimistic concurrency, then acks; a restarted gateway
  resumes where the consumer stands, and several instances split the work;
- splits the readings' batches into FLEET_TELEMETRY (forwarding.py) and
  writes each device's newest reading into its record as it goes: the
  registry never reads the readings back, which at tens of thousands a
  second would cost more than storing them;
- serves the NATS micro service `fleet`: the registry, queries, configuration
  and commands, reading and writing (writeapi.py), and its own health; the
  endpoints are listed in docs/PROTOCOL.md.

All state lives in NATS (streams, consumers, KV), none in the process.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any
from dataclasses import dataclass, field, replace

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import (
    APIError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import Request, ServiceError
from nats.micro.service import Service

from fleet import __version__
from fleet.gateway import writeapi
from fleet.state.commands import CommandRelay, results_stream_config
from fleet.gateway.configpush import ConfigPublisher, reports_stream_config
from fleet.gateway.forwarding import BatchSplitter, DeviceRound, SplitterConfig
from fleet.state.config import config_view
from fleet.errors import FleetError
from fleet.state.inventory import read_registry
from fleet.broker.jetstream import device_stream, ensure_bucket, quietly
from fleet.broker.connection import connect
from fleet.redact import redact_url
from fleet.state.query import check_fields, parse_filter, scatter
from fleet.protocol import (
    DEVICES_BUCKET,
    PRESENCE_STREAM,
    TELEMETRY_STREAM,
    api_subject,
    device_from_subject,
    nats_subject,
)
from fleet.schema import id_problem
from fleet.wire import DeviceRecord, ForwardingState, MalformedPayload, Presence, TelemetryReading

log = logging.getLogger(__name__)

SERVICE_NAME = "fleet"
PRESENCE_CONSUMER = "fleet-gateway-presence"
# Earlier gateways read every stored reading through this consumer; deleted
# at start so the server stops keeping its place.
_RETIRED_TELEMETRY_CONSUMER = "fleet-gateway-telemetry"

# JSStreamNameExistErr: the stream exists with another configuration.
_STREAM_EXISTS_WITH_OTHER_CONFIG = 10058
# Two instances racing for one record settle within a few tries; many more
# means something else writes the key in a loop.
_MAX_WRITE_ATTEMPTS = 50
# How long one devices-listing may take before the request fails with 500.
_LIST_TIMEOUT = 5.0


@dataclass(frozen=True)
class GatewayConfig:
    nats_url: str
    nats_creds: str | None = None  # a .creds file, for a server in operator mode
    telemetry_max_age: float = 7 * 24 * 3600.0  # seconds
    telemetry_max_bytes: int = 1 << 30
    duplicate_window: float = 120.0  # seconds
    presence_history: int = 16  # status messages kept per device
    batch_size: int = 256
    # How long one fetch waits for messages. stop() lets the batch in hand
    # finish instead of cancelling it (cancelled, its messages would wait out
    # ack_wait before redelivery), so this also bounds how long stop() takes.
    fetch_wait: float = 1.0
    ack_wait: float = 30.0
    connect_timeout: float = 5.0
    splitter: SplitterConfig = SplitterConfig()
    registry_every: float = 0.1  # seconds between writes of the splitter's news into a device's record
    # The MQTT listener, to publish retained configuration; None: not published.
    mqtt_host: str | None = None
    mqtt_port: int | None = None
    mqtt_username: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)
    mqtt_warn_every: float = 30.0  # seconds between warnings while the listener cannot be reached


@dataclass
class GatewayCounters:
    """What this process has seen since it started (the registry holds the rest)."""

    messages: int = 0
    malformed: int = 0
    rejected: int = 0  # subjects without a valid device id: nowhere to count them
    conflicts: int = 0  # KV writes retried because another instance wrote first
    failed_writes: int = 0  # registry writes that failed: presence left for redelivery, readings retried


@dataclass(frozen=True)
class DeviceEvent:
    """One stream message from a device, decoded; exactly one of the three is set."""

    at: float  # JetStream timestamp, unix seconds
    stream_seq: int
    presence: Presence | None = None
    reading: TelemetryReading | None = None
    malformed: str | None = None  # why the payload was rejected

    @property
    def order(self) -> tuple[float, int]:
        # Timestamps decide which message is newer; the stream sequence breaks
        # ties between messages stored in the same microsecond.
        return (self.at, self.stream_seq)


def apply_events(record: DeviceRecord | None, device_id: str, events: list[DeviceEvent]) -> DeviceRecord:
    """The record after `events`, which may be older than what it already holds.

    Pure, so a write that lost a race is simply recomputed from the newer
    record. Presence and the last reading change only for messages newer than
    the ones they came from, which makes applying a message twice (redelivery)
    harmless; only the malformed count is not idempotent.
    """
    updated = replace(record) if record is not None else DeviceRecord(id=device_id)
    for event in events:
        if updated.last_seen is None or event.at > updated.last_seen:
            updated.last_seen = event.at
        if event.malformed is not None:
            updated.malformed += 1
        elif event.presence is not None:
            if updated.presence_at is not None and event.order <= (updated.presence_at, updated.presence_stream_seq):
                continue
            presence = event.presence
            # A new boot is a new session even without an offline in between
            # (a board that reset faster than its keepalive ran out).
            new_boot = presence.boots is not None and presence.boots != updated.boots
            if updated.since is None or presence.online != updated.online or new_boot:
                updated.since = event.at
            updated.online = presence.online
            updated.board = presence.board if presence.board is not None else updated.board
            updated.firmware = presence.firmware if presence.firmware is not None else updated.firmware
            updated.boots = presence.boots if presence.boots is not None else updated.boots
            updated.reset = presence.reset if presence.reset is not None else updated.reset
            if presence.groups is not None:
                updated.groups = list(presence.groups)
            if presence.config is not None:
                updated.config_version = presence.config
            updated.presence_at, updated.presence_stream_seq = event.order
        elif event.reading is not None:
            if updated.telemetry_at is not None and event.order <= (updated.telemetry_at, updated.telemetry_stream_seq):
                continue
            updated.last_seq = event.reading.seq
            updated.last_telemetry = event.reading.payload
            updated.telemetry_at, updated.telemetry_stream_seq = event.order
    return updated


class Gateway:
    """One gateway instance; any number may run against the same server.

    An instance is started once and stopped once; start a new one to restart.
    """

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.counters = GatewayCounters()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._service: Service | None = None
        self.splitter: BatchSplitter | None = None
        self.config_publisher: ConfigPublisher | None = None
        self.command_relay: CommandRelay | None = None
        self._query_tasks: set[asyncio.Task[None]] = set()
        self._consumer_tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._stopped = asyncio.Event()
        # What the splitter's rounds did, per device, not yet in the registry.
        self._forwarded: dict[str, list[DeviceEvent]] = {}
        self._forwarded_ready = asyncio.Event()
        self._started_at: float | None = None

    @property
    def service_id(self) -> str | None:
        return self._service.id if self._service else None

    # -- life cycle ----------------------------------------------------------------
    async def start(self) -> None:
        """Connect, set up streams, bucket and consumers, start serving.

        Raises NatsUnavailable when the server cannot be reached, and the
        JetStream error when the streams cannot be created or updated.
        """
        if self._nc is not None:
            raise RuntimeError("gateway already started")
        self._nc = await connect(
            self.config.nats_url,
            name="fleet-gateway",
            timeout=self.config.connect_timeout,
            reconnect_forever=True,
            on_error=self._on_connection_error,
            creds=self.config.nats_creds,
        )
        try:
            self._js = self._nc.jetstream()
            for stream in (self._telemetry_stream_config(), self._presence_stream_config()):
                await self._ensure_stream(stream)
            self._kv = await ensure_bucket(self._js, DEVICES_BUCKET, "one record per device, kept by the fleet gateway")
            try:
                await self._js.delete_consumer(TELEMETRY_STREAM, _RETIRED_TELEMETRY_CONSUMER)
            except NotFoundError:
                pass
            self.splitter = BatchSplitter(self._nc, self._js, self.config.splitter, on_round=self._note_round)
            await self.splitter.start(self._ensure_stream)
            await self._ensure_stream(reports_stream_config())
            await self._ensure_stream(results_stream_config())
            if self.config.mqtt_host and self.config.mqtt_port:
                self.config_publisher = ConfigPublisher(
                    self._js, self.config.mqtt_host, self.config.mqtt_port,
                    username=self.config.mqtt_username, password=self.config.mqtt_password,
                    warn_every=self.config.mqtt_warn_every,
                )
                await self.config_publisher.start()
                assert self.config_publisher.client is not None
                self.command_relay = CommandRelay(self._js, self.config_publisher.client)
                await self.command_relay.start()
            else:
                log.warning("no MQTT listener given: configuration and commands are not sent to the boards")
            presence = await self._subscribe()
            self._consumer_tasks = [asyncio.create_task(self._consume(presence), name="fleet-gateway-presence")]
            self._consumer_tasks.append(
                asyncio.create_task(self._write_forwarded(), name="fleet-gateway-forwarded")
            )
            # Registered last: a gateway that answers is one that is consuming.
            self._service = await add_service(
                self._nc,
                name=SERVICE_NAME,
                version=__version__,
                description="fleet device registry",
            )
            await self._service.add_endpoint(name="devices", subject=api_subject("devices"), handler=self._handle_devices)
            await self._service.add_endpoint(name="device", subject=api_subject("device"), handler=self._handle_device)
            await self._service.add_endpoint(name="query", subject=api_subject("query"), handler=self._handle_query)
            await self._service.add_endpoint(name="config", subject=api_subject("config"), handler=self._handle_config)
            await self._service.add_endpoint(name="commands", subject=api_subject("commands"), handler=self._handle_commands)
            for name, handler in (("commands-send", self._handle_commands_send), ("config-set", self._handle_config_set),
                                  ("config-history", self._handle_config_history),
                                  ("config-rollback", self._handle_config_rollback)):
                await self._service.add_endpoint(name=name, subject=api_subject(name.replace("-", ".")), handler=handler)
            # Its own queue group: every instance answers, so a client sees each gateway's health.
            await self._service.add_endpoint(name="health", subject=api_subject("health"), handler=self._handle_health,
                                             queue_group=f"health-{self._service.id}")
            self._started_at = time.time()
        except BaseException:
            await self.stop()
            raise
        log.info("gateway %s serving %s on %s", self.service_id, SERVICE_NAME, redact_url(self.config.nats_url))

    async def stop(self) -> None:
        """Stop serving, let the batches in hand finish and be acked, disconnect."""
        if self._nc is None:
            return
        if self._stopping.is_set():
            # Stopped, or stopping in another task (run_forever's cleanup and
            # a signal handler may both get here): wait for that one.
            await self._stopped.wait()
            return
        self._stopping.set()
        if self._service is not None:
            try:
                await self._service.stop()
            except Exception as error:  # the connection may already be gone
                log.debug("stopping the service: %s", error)
        if self.command_relay is not None:
            await self.command_relay.stop()
        if self.config_publisher is not None:
            await self.config_publisher.stop()
        if self.splitter is not None:
            await self.splitter.stop()
        if self._consumer_tasks:
            _, unfinished = await asyncio.wait(self._consumer_tasks, timeout=self.config.fetch_wait + 10)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*self._consumer_tasks, return_exceptions=True)
        if self._forwarded:
            # The splitter's last rounds, after the writer stopped.
            try:
                await asyncio.wait_for(self._flush_forwarded(), 5)
            except Exception as error:
                log.warning("registry: the newest readings were not written (%s)", error)
        try:
            # Acks are fire-and-forget publishes: flush them before closing so
            # the next instance does not get the same messages again.
            if self._nc.is_connected:
                await self._nc.flush(timeout=2)
        except Exception as error:
            log.debug("flushing before close: %s", error)
        await self._nc.close()
        self._stopped.set()
        log.info("gateway %s stopped", self.service_id)

    async def run_forever(self) -> None:
        """Start (unless started) and run until cancelled or stop() is called."""
        if self._nc is None:
            await self.start()
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    async def _on_connection_error(self, error: Exception) -> None:
        # nats-py keeps reconnecting; one line per problem is enough.
        log.warning("NATS connection: %s", str(error) or type(error).__name__)

    # -- JetStream setup -------------------------------------------------------------
    def _telemetry_stream_config(self) -> api.StreamConfig:
        return device_stream(
            TELEMETRY_STREAM,
            "device telemetry readings, captured from the MQTT gateway",
            "telemetry",
            max_age=self.config.telemetry_max_age,
            max_bytes=self.config.telemetry_max_bytes,
            duplicate_window=self.config.duplicate_window,
        )

    def _presence_stream_config(self) -> api.StreamConfig:
        return device_stream(
            PRESENCE_STREAM,
            "device birth and last-will messages, the latest few per device",
            "status",
            max_msgs_per_subject=self.config.presence_history,
            duplicate_window=self.config.duplicate_window,
        )

    async def _ensure_stream(self, config: api.StreamConfig) -> None:
        assert self._js is not None
        try:
            # Creating with the same configuration is a no-op on the server,
            # so concurrent instances and restarts go through here.
            await self._js.add_stream(config)
        except APIError as error:
            if error.err_code != _STREAM_EXISTS_WITH_OTHER_CONFIG:
                raise
            await self._js.update_stream(config)
            log.info("stream %s updated to the configured limits", config.name)

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        """The durable consumer of the boards' presence (the registry's
        only stream: readings come from the splitter)."""
        assert self._js is not None
        consumer = api.ConsumerConfig(
            description="fleet gateway: presence into the device registry",
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.config.ack_wait,
            max_deliver=-1,
        )
        return await self._js.pull_subscribe(
            nats_subject("*", "status"), durable=PRESENCE_CONSUMER, stream=PRESENCE_STREAM, config=consumer
        )

    # -- consuming -----------------------------------------------------------------
    async def _consume(self, subscription: JetStreamContext.PullSubscription) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                messages = await subscription.fetch(self.config.batch_size, timeout=self.config.fetch_wait)
            except asyncio.TimeoutError:
                # Nothing to do within fetch_wait (nats-py raises both its own
                # TimeoutError subclass and the plain one here).
                continue
            except Exception as error:
                if self._stopping.is_set():
                    break
                log.warning("presence: fetch failed (%r); retrying in %.1f s", error, backoff)
                if isinstance(error, APIError):
                    # The stream or consumer may have been deleted by hand:
                    # put them back (the stream then captures from now on).
                    subscription = await self._resubscribe(subscription)
                await self._sleep_unless_stopping(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.5
            await self._process_batch(messages)

    async def _resubscribe(self, subscription: JetStreamContext.PullSubscription) -> JetStreamContext.PullSubscription:
        try:
            await self._ensure_stream(self._presence_stream_config())
            fresh = await self._subscribe()
        except Exception as error:
            log.warning("presence: cannot set up the consumer again: %s", error)
            return subscription
        try:
            await subscription.unsubscribe()
        except Exception:
            pass  # the old inbox goes with the connection anyway
        return fresh

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _decode(self, device_id: str, message: Msg) -> DeviceEvent:
        metadata = message.metadata
        at = metadata.timestamp.timestamp()
        stream_seq = metadata.sequence.stream
        try:
            return DeviceEvent(at, stream_seq, presence=Presence.parse(device_id, message.data))
        except MalformedPayload as error:
            self.counters.malformed += 1
            log.warning(
                "device %s: malformed presence payload (%s): %r", device_id, error.args[0], message.data[:120]
            )
            return DeviceEvent(at, stream_seq, malformed=str(error.args[0]))

    async def _process_batch(self, messages: list[Msg]) -> None:
        by_device: dict[str, list[tuple[DeviceEvent, Msg]]] = {}
        for message in messages:
            self.counters.messages += 1
            device_id = device_from_subject(message.subject)
            if device_id is None:
                self.counters.rejected += 1
                log.warning("presence: no valid device id in subject %r; dropped", message.subject)
                await quietly(message.term())
                continue
            by_device.setdefault(device_id, []).append((self._decode(device_id, message), message))
        await asyncio.gather(*(self._settle(device_id, items) for device_id, items in by_device.items()))

    async def _settle(self, device_id: str, items: list[tuple[DeviceEvent, Msg]]) -> None:
        """Write the device's record for this batch, then ack its messages."""
        try:
            await self._write_record(device_id, [event for event, _ in items])
        except Exception as error:
            self.counters.failed_writes += 1
            log.warning("device %s: registry write failed (%s); messages will be redelivered", device_id, error)
            for _, message in items:
                await quietly(message.nak(delay=1.0))
            return
        for _, message in items:
            await quietly(message.ack())

    # -- the readings, from the splitter ---------------------------------------------
    def _note_round(self, news: dict[str, DeviceRound]) -> None:
        """Called by the splitter after each stored round: queue the news.

        Only the newest reading per device is kept, as apply_events would
        keep only it anyway; the writes happen in _write_forwarded, so the
        splitter never waits for the registry.
        """
        for device_id, round_ in news.items():
            events = self._forwarded.setdefault(device_id, [])
            events.extend(DeviceEvent(round_.seen_at, 0, malformed=why) for why in round_.malformed)
            if round_.newest is None:
                continue
            events[:] = [event for event in events if event.reading is None]
            events.append(DeviceEvent(round_.seen_at, round_.newest_stream_seq, reading=round_.newest))
        if news:
            self._forwarded_ready.set()

    async def _write_forwarded(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            if not self._forwarded:
                try:
                    await asyncio.wait_for(self._forwarded_ready.wait(), self.config.fetch_wait)
                except asyncio.TimeoutError:
                    continue
            if await self._flush_forwarded():
                backoff = 0.5
                # Rounds come every few milliseconds while a backlog drains:
                # news that waits a moment costs one write for many rounds.
                await self._sleep_unless_stopping(self.config.registry_every)
                continue
            await self._sleep_unless_stopping(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _flush_forwarded(self) -> bool:
        """Write the queued news into the registry; False if a write failed."""
        self._forwarded_ready.clear()
        pending, self._forwarded = self._forwarded, {}
        outcomes = await asyncio.gather(
            *(self._write_record(device_id, events) for device_id, events in pending.items()),
            return_exceptions=True,
        )
        written = True
        for (device_id, events), outcome in zip(pending.items(), outcomes):
            if isinstance(outcome, BaseException):
                # The readings are stored; only the registry's view of them
                # waits. Put the news back with anything newer.
                written = False
                self.counters.failed_writes += 1
                log.warning("device %s: registry write failed (%s); will retry", device_id, outcome)
                self._forwarded[device_id] = [*events, *self._forwarded.get(device_id, [])]
        return written

    async def _write_record(self, device_id: str, events: list[DeviceEvent]) -> DeviceRecord:
        assert self._kv is not None
        for attempt in range(_MAX_WRITE_ATTEMPTS):
            current, revision = await self._read_record(device_id)
            updated = apply_events(current, device_id, events)
            try:
                if revision == 0:
                    await self._kv.create(device_id, updated.to_bytes())
                else:
                    await self._kv.update(device_id, updated.to_bytes(), last=revision)
                return updated
            except KeyWrongLastSequenceError:
                # Another instance wrote the record since we read it: read
                # again and recompute. The jitter keeps two instances from
                # colliding in lockstep.
                self.counters.conflicts += 1
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise RuntimeError(f"{_MAX_WRITE_ATTEMPTS} conflicting writes in a row")

    async def _read_record(self, device_id: str) -> tuple[DeviceRecord | None, int]:
        """The stored record and its revision; (None, 0) when there is none."""
        assert self._kv is not None
        try:
            entry = await self._kv.get(device_id)
        except KeyNotFoundError:
            return None, 0
        try:
            return DeviceRecord.from_json(entry.value or b""), entry.revision or 0
        except ValueError as error:
            # Not written by a gateway (someone used `nats kv put`): start
            # over rather than stop updating this device.
            log.warning("device %s: unreadable registry record replaced (%s)", device_id, error)
            return None, entry.revision or 0

    # -- the fleet API ---------------------------------------------------------------
    async def list_records(self) -> list[DeviceRecord]:
        """Every record in the registry, sorted by device id."""
        assert self._kv is not None
        return await asyncio.wait_for(read_registry(self._kv), _LIST_TIMEOUT)

    async def _handle_devices(self, request: Request) -> None:
        records = await self.list_records()
        assert self.splitter is not None
        forwarding = await self.splitter.states()
        for record in records:
            _merge_forwarding(record, forwarding.get(record.id))
        await request.respond(_json_list([record.to_bytes() for record in records]))

    async def _handle_query(self, request: Request) -> None:
        """Scatter a query; every matching board's answer goes to the requester.

        The request is {"where": "...", "fields": [...], "timeout": s} or just
        the filter text. Answers arrive as separate replies (`nats req
        --replies 0`); the handler returns at once and relays in the background.
        """
        text = request.data.decode("utf-8", errors="replace").strip()
        try:
            body = json.loads(text) if text.startswith("{") else {"where": text}
            where = parse_filter(str(body.get("where") or ""))
            fields = check_fields(list(body["fields"])) if body.get("fields") else None
            timeout = min(max(float(body.get("timeout", 2.0)), 0.1), 30.0)
        except (ValueError, TypeError) as error:
            raise ServiceError("400", str(error)) from None
        task = asyncio.create_task(_relay_query(self, request, where, fields, timeout))
        self._query_tasks.add(task)
        task.add_done_callback(self._query_tasks.discard)

    async def _handle_config(self, request: Request) -> None:
        """A device id -> its desired and reported configuration, in sync or not."""
        assert self._nc is not None
        device_id = request.data.decode("utf-8", errors="replace").strip()
        if problem := id_problem(device_id):
            raise ServiceError("400", problem)
        view = await config_view(self._nc, device_id)
        await request.respond(json.dumps(view.to_json()).encode())

    async def _handle_commands(self, request: Request) -> None:
        """A command id -> its record; {"device": id} -> that device's commands."""
        relay = self.command_relay
        if relay is None or relay.store is None:
            raise ServiceError("503", "commands are off: the gateway has no MQTT listener")
        text = request.data.decode("utf-8", errors="replace").strip()
        if text.startswith("{"):
            try:
                device_id = str(json.loads(text)["device"])
            except (ValueError, KeyError, TypeError):
                raise ServiceError("400", 'expected a command id or {"device": "<id>"}') from None
            records = [r for r in await relay.store.all() if r.device == device_id]
            await request.respond(_json_list([r.to_bytes() for r in records]))
            return
        try:
            record, _ = await relay.store.get(text)
        except (KeyNotFoundError, ValueError):
            raise ServiceError("404", f"unknown command {text!r}") from None
        await request.respond(record.to_bytes())

    def health(self) -> dict[str, Any]:
        """What this instance can reach: fleet-api.health's answer."""
        publisher = self.config_publisher
        mqtt = None if publisher is None else {
            "address": getattr(publisher, "mqtt_address", f"{self.config.mqtt_host}:{self.config.mqtt_port}"),
            "connected": bool(getattr(publisher, "mqtt_connected", False)),
            "error": getattr(publisher, "mqtt_error", None),
            "since": getattr(publisher, "mqtt_since", None),
        }
        return {
            "instance": self.service_id,
            "version": __version__,
            "nats_url": redact_url(self.config.nats_url),
            "started": self._started_at,
            "mqtt": mqtt,
        }

    async def _write(self, request: Request, action: Any) -> Any:
        # A writing request: the CLI's checks, their one-sentence errors as micro error replies.
        assert self._nc is not None
        try:
            return await action(self._nc, writeapi.parse_body(request.data))
        except FleetError as error:
            raise ServiceError(writeapi.status_of(error), str(error)) from None

    async def _handle_commands_send(self, request: Request) -> None:
        records = await self._write(request, writeapi.send_command)
        await request.respond(_json_list([record.to_bytes() for record in records]))

    async def _handle_config_set(self, request: Request) -> None:
        level = await self._write(request, writeapi.set_config)
        await request.respond(json.dumps(level.to_json()).encode())

    async def _handle_config_history(self, request: Request) -> None:
        levels = await self._write(request, writeapi.config_history)
        await request.respond(json.dumps([level.to_json() for level in levels]).encode())

    async def _handle_config_rollback(self, request: Request) -> None:
        level = await self._write(request, writeapi.rollback_config)
        await request.respond(json.dumps(level.to_json()).encode())

    async def _handle_health(self, request: Request) -> None:
        await request.respond(json.dumps(self.health()).encode())

    async def _handle_device(self, request: Request) -> None:
        assert self._kv is not None
        device_id = request.data.decode("utf-8", errors="replace").strip()
        if problem := id_problem(device_id):
            raise ServiceError("400", problem)
        try:
            entry = await self._kv.get(device_id)
        except KeyNotFoundError:
            raise ServiceError("404", f"unknown device {device_id}") from None
        record = DeviceRecord.from_json(entry.value or b"")
        assert self.splitter is not None
        _merge_forwarding(record, await self.splitter.state(device_id))
        await request.respond(record.to_bytes())


async def _relay_query(gateway: "Gateway", request: Request, where: Any, fields: Any, timeout: float) -> None:
    assert gateway._nc is not None

    async def relay(found: dict[str, Any]) -> None:
        await request.respond(json.dumps(found).encode())

    try:
        outcome = await scatter(gateway._nc, where, fields, timeout, on_match=relay)
        for device, error in sorted(outcome.errors.items()):
            await request.respond(json.dumps({"id": device, "error": error}).encode())
        # The end: an empty payload (nats.js requestMany's "sentinel", `nats req
        # --wait-for-empty`) whose headers carry the counts and the silent boards.
        await request.respond(b"", headers={
            "Fleet-Matching": str(len(outcome.matches)),
            "Fleet-Answered": str(len(outcome.answered)),
            "Fleet-Online": str(len(outcome.online)),
            "Fleet-Silent": ",".join(outcome.missing),
            "Fleet-Errors": str(len(outcome.errors)),
        })
    except Exception as error:  # the requester has its answers so far; say why it ended
        log.warning("query relay ended early: %s", error)


def _merge_forwarding(record: DeviceRecord, state: ForwardingState | None) -> None:
    # The splitter's counts are fresher than the last reading's own fields:
    # the batch says how much was still waiting when it was sent.
    if state is None:
        return
    record.backlog = state.backlog
    record.dropped = state.dropped
    record.forwarded = state.forwarded
    record.duplicates = state.duplicates


def _json_list(encoded_items: list[bytes]) -> bytes:
    return b"[" + b",".join(encoded_items) + b"]"


__all__ = [
    "DeviceEvent",
    "Gateway",
    "GatewayConfig",
    "GatewayCounters",
    "PRESENCE_CONSUMER",
    "SERVICE_NAME",
    "apply_events",
]
