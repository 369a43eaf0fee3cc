"""Telemetry as it is stored, like tail(1): the last readings of FLEET_TELEMETRY,
then, when following, new ones as they arrive.

Reads the stream, not the live subjects, so history can be shown and
nothing is missed between looking back and following on. Consumers are
ephemeral and in memory: they cost the server nothing once we are gone.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TextIO

from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from fleet.errors import Unavailable
from fleet.state.inventory import UnknownDevice, known_device
from fleet.broker.connection import connect
from fleet.protocol import TELEMETRY_STREAM, device_from_subject, nats_subject
from fleet.schema import id_problem
from fleet.redact import redact_url
from fleet.wire import MalformedPayload, TelemetryReading

DEFAULT_LAST = 10  # as tail(1)


class StreamMissing(Unavailable):
    """FLEET_TELEMETRY does not exist yet (no gateway has ever run on this server)."""


@dataclass(frozen=True)
class Reading:
    device: str
    stream_seq: int
    time: float  # when the server stored it, unix seconds
    payload: dict[str, Any] | str  # the reading, or the raw text when malformed

    @property
    def malformed(self) -> bool:
        return isinstance(self.payload, str)

    @classmethod
    def from_msg(cls, message: Msg) -> Reading:
        metadata = message.metadata
        payload: dict[str, Any] | str
        try:
            payload = TelemetryReading.parse(message.data).payload
        except MalformedPayload:
            payload = message.data.decode("utf-8", errors="replace")
        return cls(
            device=device_from_subject(message.subject) or message.subject,
            stream_seq=metadata.sequence.stream,
            time=metadata.timestamp.timestamp(),
            payload=payload,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "stream_seq": self.stream_seq,
            "time": self.time,
            "malformed": self.malformed,
            "payload": self.payload,
        }

    def format_line(self) -> str:
        """'12:00:01.250 dev-1 #42 seq=65 boot=2 temp_c=23.31 ...' (local time)."""
        clock = datetime.fromtimestamp(self.time).strftime("%H:%M:%S.%f")[:-3]
        if isinstance(self.payload, str):
            body = f"MALFORMED {self.payload[:200]!r}"
        else:
            body = " ".join(f"{name}={json.dumps(value)}" for name, value in self.payload.items())
        return f"{clock} {self.device} #{self.stream_seq} {body}"


class CsvTable:
    """Readings as CSV: device, seq, time (ISO 8601, UTC), then the fields.

    The stored readings are held until all of them are in (`caught_up`), so
    the header names the union of their fields, sorted. When following, the
    header cannot change once printed: fields it lacks go, as one JSON object,
    into a trailing `extra` column (also where a malformed reading's text goes).
    """

    def __init__(self, out: TextIO, following: bool) -> None:
        self._out = out
        self._writer = csv.writer(out, lineterminator="\n")
        self._following = following
        self._held: list[Reading] | None = []
        self._fields: list[str] = []
        self._extra = following

    def add(self, reading: Reading) -> None:
        if self._held is not None:
            self._held.append(reading)
            return
        self._writer.writerow(self._row(reading))
        self._out.flush()  # often piped into another program

    def caught_up(self) -> None:
        """Print the header and the held readings; later ones print at once."""
        if self._held is None:
            return
        held, self._held = self._held, None
        names = {name for r in held if isinstance(r.payload, dict) for name in r.payload}
        self._fields = sorted(names - {"seq"})
        self._extra = self._following or any(r.malformed for r in held)
        self._writer.writerow(["device", "seq", "time", *self._fields, *(["extra"] if self._extra else [])])
        for reading in held:
            self._writer.writerow(self._row(reading))
        self._out.flush()

    def _row(self, reading: Reading) -> list[str]:
        when = datetime.fromtimestamp(reading.time, timezone.utc).isoformat(timespec="milliseconds")
        if isinstance(reading.payload, str):
            cells = [reading.device, "", when, *([""] * len(self._fields))]
            return [*cells, json.dumps({"malformed": reading.payload})] if self._extra else cells
        payload = reading.payload
        cells = [reading.device, _cell(payload.get("seq")), when, *(_cell(payload.get(name)) for name in self._fields)]
        if not self._extra:
            return cells
        known = {"seq", *self._fields}
        unseen = {name: value for name, value in payload.items() if name not in known}
        return [*cells, json.dumps(unseen) if unseen else ""]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


async def _pending(js: JetStreamContext, subject: str, start: api.ConsumerConfig) -> int:
    """How many stored messages on `subject` a consumer starting at `start` would get.

    Asked of the server by creating a throwaway consumer: its creation reply
    carries the count, without delivering anything.
    """
    probe = await js.add_consumer(
        TELEMETRY_STREAM,
        config=api.ConsumerConfig(
            filter_subject=subject,
            deliver_policy=start.deliver_policy,
            opt_start_seq=start.opt_start_seq,
            opt_start_time=start.opt_start_time,
            ack_policy=api.AckPolicy.NONE,
            mem_storage=True,
            inactive_threshold=10.0,  # cleans itself up should the delete below not arrive
        ),
    )
    try:
        return probe.num_pending or 0
    finally:
        assert probe.name is not None
        await js.delete_consumer(TELEMETRY_STREAM, probe.name)


def _from_sequence(seq: int) -> api.ConsumerConfig:
    return api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq)


def _from_time(when: float) -> api.ConsumerConfig:
    return api.ConsumerConfig(
        deliver_policy=api.DeliverPolicy.BY_START_TIME, opt_start_time=datetime.fromtimestamp(when, timezone.utc)
    )


async def _pending_from(js: JetStreamContext, subject: str, start_seq: int) -> int:
    """How many stored messages on `subject` have a sequence >= start_seq."""
    return await _pending(js, subject, _from_sequence(start_seq))


async def _start_sequence(js: JetStreamContext, subject: str, last: int) -> int:
    """The stream sequence from which exactly the `last` latest matches follow.

    Readings of one device are interleaved with everyone else's, so the start
    is found by binary search over the count of matches from a sequence on:
    about log2(stream length) cheap probes, never a read of the history.
    Readings stored during the search may make it start a little later.
    """
    state = (await js.stream_info(TELEMETRY_STREAM)).state
    after_last = state.last_seq + 1
    if last <= 0 or state.messages == 0:
        return after_last
    low, high = state.first_seq, state.last_seq
    if await _pending_from(js, subject, low) <= last:
        return low
    # Invariant: at least `last` matches from `low` on; find the largest such low.
    while low < high:
        middle = (low + high + 1) // 2
        if await _pending_from(js, subject, middle) >= last:
            low = middle
        else:
            high = middle - 1
    return low


async def _start(
    js: JetStreamContext, subject: str, last: int | None, since: float | None
) -> tuple[api.ConsumerConfig, int]:
    """Where to start and how many stored readings follow from there.

    last None: every stored reading (since `since`); since None: no time bound.
    """
    if since is not None:
        by_time = _from_time(since)
        newer = await _pending(js, subject, by_time)
        if last is None or newer <= last:
            return by_time, newer
        # More than `last` readings since then: the `last` latest are all newer.
    if last is None:
        first = max((await js.stream_info(TELEMETRY_STREAM)).state.first_seq, 1)
        by_seq = _from_sequence(first)
    else:
        by_seq = _from_sequence(await _start_sequence(js, subject, last))
    # Counted from the start found: a reading stored after this count is new.
    return by_seq, await _pending(js, subject, by_seq)


async def _check_known(js: JetStreamContext, device: str, subject: str) -> None:
    """UnknownDevice unless the registry knows the device or it has readings stored:
    a typo must not wait forever for readings that never come."""
    try:
        await known_device(js, device)
    except UnknownDevice:
        if await _pending(js, subject, api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)) == 0:
            raise


async def _discard(js: JetStreamContext, subscription: JetStreamContext.PushSubscription) -> None:
    """Unsubscribe and delete the consumer now, not when the server notices it is idle."""
    try:
        # Asked, not remembered: the ordered consumer is recreated under a
        # new name whenever it detects a gap.
        name = (await subscription.consumer_info()).name
        await subscription.unsubscribe()
        if name:
            await js.delete_consumer(TELEMETRY_STREAM, name)
    except Exception:
        pass  # best effort: an ephemeral consumer without interest goes away by itself


def _check_device_id(device: str | None) -> None:
    if device is not None and (problem := id_problem(device)):
        raise ValueError(problem)


async def _stream_exists(js: JetStreamContext, nats_url: str) -> None:
    try:
        await js.stream_info(TELEMETRY_STREAM)
    except NotFoundError:
        raise StreamMissing(
            f"no {TELEMETRY_STREAM} stream on {redact_url(nats_url)}: start `fleet gateway` once to create it"
        ) from None


async def tail(
    nats_url: str,
    device: str | None,
    *,
    last: int | None = DEFAULT_LAST,
    since: float | None = None,
    follow: bool = False,
    limit: int | None = None,
    on_reading: Callable[[Reading], None],
    on_caught_up: Callable[[], None] | None = None,
    timeout: float = 5.0,
) -> int:
    """Call on_reading for telemetry of `device` (None: all devices), oldest first.

    First the `last` latest stored readings (None: all of them), only those
    stored at or after `since` (unix time) if given; then on_caught_up, once.
    With `follow`, then new readings as they are stored, until cancelled.
    Stops after `limit` readings in all. Returns how many were delivered.
    Raises NatsUnavailable, StreamMissing, UnknownDevice (an id that neither
    the registry nor the stream knows), or ValueError for an invalid id.
    """
    _check_device_id(device)
    subject = nats_subject(device or "*", "telemetry")
    nc = await connect(nats_url, name="fleet-tail", timeout=timeout)
    delivered = 0
    try:
        js = nc.jetstream(timeout=timeout)
        await _stream_exists(js, nats_url)
        if device is not None:
            await _check_known(js, device, subject)
        start, stored_count = await _start(js, subject, last, since)
        backlog = stored_count if limit is None else min(stored_count, limit)
        if backlog == 0 and not (follow and (limit is None or limit > 0)):
            if on_caught_up is not None:
                on_caught_up()
            return 0
        # From a sequence or time rather than "new": what is stored between
        # the look back and the subscription is delivered, not skipped.
        subscription = await js.subscribe(subject, stream=TELEMETRY_STREAM, ordered_consumer=True, config=start)
        try:
            while delivered < backlog:
                on_reading(Reading.from_msg(await subscription.next_msg(timeout=timeout)))
                delivered += 1
            if on_caught_up is not None:
                on_caught_up()
            while follow and (limit is None or delivered < limit):
                on_reading(Reading.from_msg(await subscription.next_msg(timeout=None)))
                delivered += 1
        finally:
            await _discard(js, subscription)
    finally:
        await nc.close()
    return delivered


async def follow(
    nats_url: str,
    device: str | None,
    *,
    last: int = 0,
    limit: int | None = None,
    on_reading: Callable[[Reading], None],
    timeout: float = 5.0,
) -> int:
    """The `last` latest stored readings, then new ones until `limit` (else until cancelled)."""
    return await tail(nats_url, device, last=last, follow=True, limit=limit, on_reading=on_reading, timeout=timeout)


async def stored(nats_url: str, device: str | None, *, timeout: float = 5.0, creds: str | None = None) -> list[Reading]:
    """Every telemetry message of `device` (None: all) stored right now, oldest first.

    Unlike tail(), an id nobody knows is no error here: it has no readings."""
    _check_device_id(device)
    subject = nats_subject(device or "*", "telemetry")
    nc = await connect(nats_url, name="fleet-tail", timeout=timeout, creds=creds)
    try:
        js = nc.jetstream(timeout=timeout)
        await _stream_exists(js, nats_url)
        start, count = await _start(js, subject, None, None)
        readings: list[Reading] = []
        if count == 0:
            return readings
        subscription = await js.subscribe(subject, stream=TELEMETRY_STREAM, ordered_consumer=True, config=start)
        try:
            while len(readings) < count:
                readings.append(Reading.from_msg(await subscription.next_msg(timeout=timeout)))
        finally:
            await _discard(js, subscription)
        return readings
    finally:
        await nc.close()


__all__ = ["DEFAULT_LAST", "CsvTable", "Reading", "StreamMissing", "follow", "stored", "tail"]
