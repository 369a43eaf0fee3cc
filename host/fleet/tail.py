"""Follow telemetry as it is stored: an ordered consumer on FLEET_TELEMETRY.

Reads the stream, not the live subjects, so `--last N` can show history and
nothing is missed between looking back and following on. The consumer is
ephemeral and in memory: it costs the server nothing once we are gone.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from .natsconn import connect
from .errors import Unavailable
from .redact import redact_url
from .protocol import TELEMETRY_STREAM, device_from_subject, is_valid_device_id, nats_subject
from .wire import MalformedPayload, TelemetryReading


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
            device=device_from_subject(message.subject),
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


async def _pending_from(js: JetStreamContext, subject: str, start_seq: int) -> int:
    """How many stored messages on `subject` have a sequence >= start_seq.

    Asked of the server by creating a throwaway consumer: its creation reply
    carries the count, without delivering anything.
    """
    probe = await js.add_consumer(
        TELEMETRY_STREAM,
        config=api.ConsumerConfig(
            filter_subject=subject,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start_seq,
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


async def follow(
    nats_url: str,
    device: str | None,
    *,
    last: int = 0,
    limit: int | None = None,
    on_reading: Callable[[Reading], None],
    timeout: float = 5.0,
) -> int:
    """Call on_reading for each telemetry message of `device` (None: all devices).

    Starts with the `last` latest stored readings, then new ones as they are
    stored; returns after `limit` readings, else runs until cancelled.
    Returns how many readings were delivered. Raises NatsUnavailable,
    StreamMissing, or ValueError for an invalid device id.
    """
    if device is not None and not is_valid_device_id(device):
        raise ValueError(f"invalid device id {device!r}: expected [A-Za-z0-9_-]{{1,32}}")
    if limit is not None and limit <= 0:
        return 0
    subject = nats_subject(device or "*", "telemetry")
    nc = await connect(nats_url, name="fleet-tail", timeout=timeout)
    delivered = 0
    try:
        js = nc.jetstream(timeout=timeout)
        try:
            start_seq = await _start_sequence(js, subject, last)
        except NotFoundError:
            raise StreamMissing(
                f"no {TELEMETRY_STREAM} stream on {redact_url(nats_url)}: start `fleet gateway` once to create it"
            ) from None
        # From a sequence rather than "new": what is stored between the look
        # back and the subscription is delivered, not skipped.
        subscription = await js.subscribe(
            subject,
            stream=TELEMETRY_STREAM,
            ordered_consumer=True,
            config=api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start_seq,
            ),
        )
        try:
            while limit is None or delivered < limit:
                message = await subscription.next_msg(timeout=None)
                on_reading(Reading.from_msg(message))
                delivered += 1
        finally:
            await _discard(js, subscription)
    finally:
        await nc.close()
    return delivered


async def stored(nats_url: str, device: str | None, *, timeout: float = 5.0) -> list[Reading]:
    """Every telemetry message of `device` (None: all) stored right now, oldest first."""
    if device is not None and not is_valid_device_id(device):
        raise ValueError(f"invalid device id {device!r}: expected [A-Za-z0-9_-]{{1,32}}")
    subject = nats_subject(device or "*", "telemetry")
    nc = await connect(nats_url, name="fleet-tail", timeout=timeout)
    try:
        js = nc.jetstream(timeout=timeout)
        try:
            info = await js.stream_info(TELEMETRY_STREAM)
        except NotFoundError:
            raise StreamMissing(f"no {TELEMETRY_STREAM} stream on {redact_url(nats_url)}") from None
        first = max(info.state.first_seq, 1)
        count = await _pending_from(js, subject, first)
        readings: list[Reading] = []
        if count == 0:
            return readings
        subscription = await js.subscribe(
            subject,
            stream=TELEMETRY_STREAM,
            ordered_consumer=True,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first),
        )
        try:
            while len(readings) < count:
                readings.append(Reading.from_msg(await subscription.next_msg(timeout=timeout)))
        finally:
            await _discard(js, subscription)
        return readings
    finally:
        await nc.close()


__all__ = ["Reading", "StreamMissing", "follow", "stored"]
