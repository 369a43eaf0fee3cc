"""Store-and-forward, host side: batches from the boards' logs into one
telemetry message per reading, exactly once and in order.

A board forwards its flash log oldest first as QoS 1 messages on
fleet/<id>/batch. The stream FLEET_BATCHES captures them by itself (nothing is
lost while no gateway runs). The splitter reads that stream through a durable
pull consumer and publishes each record to fleet.<id>.telemetry, where
FLEET_TELEMETRY stores it. Exactly once rests on two things:

- a per-device high-water mark (the last sequence stored) in the KV bucket
  `fleet_forwarding`: the board's sequence only grows and its log is sent in
  order, so a record at or below the mark is a batch sent again after a lost
  PUBACK, however long after;
- a JetStream message id `<id>:<seq>` on every publish, so a splitter that
  dies between publishing and moving the mark republishes into the stream's
  duplicate window and nothing is stored twice.

The board's log moves on only when the splitter answers on fleet/<id>/ack
with the last sequence stored: nats-server acknowledges an MQTT QoS 1
publish before a capturing stream has stored it (a broker stopping in that
moment acknowledges batches it never stores), so the PUBACK is not enough.

Order needs one splitter at a time: every gateway instance runs one, and a
lease in the KV bucket `fleet_leases` (a key that expires unless its holder
renews it) decides which one fetches. The others wait to take over.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)
from nats.js.kv import KeyValue

from .jetstream import bucket_keys, ensure_bucket, quietly
from .protocol import BATCH_STREAM, FORWARDING_BUCKET, LEASE_BUCKET, nats_subject
from .wire import ForwardingState, MalformedPayload, ReadingBatch

log = logging.getLogger(__name__)

SPLITTER_CONSUMER = "fleet-gateway-splitter"
_LEASE_KEY = "splitter"
_GAPS_KEPT = 16


@dataclass(frozen=True)
class SplitterConfig:
    batch_max_age: float = 7 * 24 * 3600.0  # seconds a batch stays in FLEET_BATCHES
    duplicate_window: float = 120.0
    fetch_wait: float = 1.0
    publish_timeout: float = 5.0  # for the stream's acks of one batch
    ack_wait: float = 10.0  # a holder that died: its batch goes to the next one after this
    lease_ttl: float = 6.0  # a stopped or frozen holder is replaced after this


@dataclass
class SplitterCounters:
    batches: int = 0
    forwarded: int = 0
    duplicates: int = 0
    malformed: int = 0
    failed: int = 0  # attempts that failed and were retried (JetStream unavailable)


def batch_stream_config(config: SplitterConfig) -> api.StreamConfig:
    return api.StreamConfig(
        name=BATCH_STREAM,
        description="readings forwarded from the boards' flash logs, several per message",
        subjects=[nats_subject("*", "batch")],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_age=config.batch_max_age,
        duplicate_window=config.duplicate_window,
    )


class BatchSplitter:
    """Runs inside a gateway; only the lease holder splits."""

    def __init__(self, nc: Client, js: JetStreamContext, config: SplitterConfig) -> None:
        self.nc = nc
        self.js = js
        self.config = config
        self.counters = SplitterCounters()
        self.instance = uuid.uuid4().hex[:12]
        self.leader = False
        self._state: KeyValue | None = None
        self._leases: KeyValue | None = None
        self._lease_revision = 0
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def start(self, stream_setup: Callable[[api.StreamConfig], Awaitable[None]]) -> None:
        await stream_setup(batch_stream_config(self.config))
        self._state = await ensure_bucket(
            self.js, FORWARDING_BUCKET, "per device: last sequence forwarded, counts, gaps"
        )
        self._leases = await ensure_bucket(
            self.js, LEASE_BUCKET, "which gateway instance does what; keys expire", ttl=self.config.lease_ttl
        )
        subscription = await self.js.pull_subscribe(
            nats_subject("*", "batch"),
            durable=SPLITTER_CONSUMER,
            stream=BATCH_STREAM,
            config=api.ConsumerConfig(
                description="fleet gateway: batches into one telemetry message per reading",
                deliver_policy=api.DeliverPolicy.ALL,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=self.config.ack_wait,
                max_deliver=-1,
                max_ack_pending=1,  # strict order: see _run
            ),
        )
        self._task = asyncio.create_task(self._run(subscription), name="fleet-gateway-splitter")

    async def stop(self) -> None:
        self._stopping.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, self.config.fetch_wait + 10)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                pass
        if self.leader and self._leases is not None:
            # Hand over now rather than after the lease runs out.
            try:
                await self._leases.delete(_LEASE_KEY, last=self._lease_revision)
            except Exception as error:
                log.debug("releasing the splitter lease: %s", error)
            self.leader = False

    async def states(self) -> dict[str, ForwardingState]:
        """Every device's forwarding state, by device id."""
        assert self._state is not None
        found: dict[str, ForwardingState] = {}
        for key in await bucket_keys(self._state):
            state = await self.state(key)
            if state is not None:
                found[key] = state
        return found

    async def state(self, device_id: str) -> ForwardingState | None:
        assert self._state is not None
        try:
            entry = await self._state.get(device_id)
        except KeyNotFoundError:
            return None
        try:
            return ForwardingState.from_json(entry.value or b"")
        except ValueError:
            return None

    # -- the lease -------------------------------------------------------------------
    async def _hold_lease(self) -> bool:
        """Take the lease or renew it; True while this instance holds it."""
        assert self._leases is not None
        try:
            if self.leader:
                self._lease_revision = await self._leases.update(
                    _LEASE_KEY, self.instance.encode(), last=self._lease_revision
                )
            else:
                self._lease_revision = await self._leases.create(_LEASE_KEY, self.instance.encode())
                log.info("splitter %s: holding the lease", self.instance)
            self.leader = True
        except KeyWrongLastSequenceError:
            if self.leader:
                log.warning("splitter %s: lost the lease", self.instance)
            self.leader = False
        except Exception as error:
            log.debug("splitter lease: %s", error)
            self.leader = False
        return self.leader

    # -- splitting ---------------------------------------------------------------------
    async def _run(self, subscription: JetStreamContext.PullSubscription) -> None:
        renew_every = self.config.lease_ttl / 3
        renewed = -renew_every
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            if loop.time() - renewed >= renew_every:
                await self._hold_lease()
                renewed = loop.time()
            if not self.leader:
                await self._sleep_unless_stopping(renew_every)
                continue
            try:
                # The consumer hands out one batch at a time (max_ack_pending
                # 1), so batches are split in stream order even across
                # redeliveries and a change of lease holder.
                messages = await subscription.fetch(1, timeout=min(self.config.fetch_wait, renew_every))
            except asyncio.TimeoutError:
                continue
            except Exception as error:
                if self._stopping.is_set():
                    break
                log.warning("splitter: fetch failed (%r)", error)
                await self._sleep_unless_stopping(1.0)
                continue
            for message in messages:
                await self._split_until_done(message)

    async def _split_until_done(self, message: Msg) -> None:
        # A failure here is JetStream being unavailable (a broker restart):
        # try the same batch again rather than let a later one overtake it.
        backoff = 0.2
        while True:
            try:
                device_id, last_seq = await self._split(message)
                await quietly(message.ack())
                # The board moves its log on only when it hears this: sent for
                # duplicates too, so a board that missed it catches up.
                await quietly(self.nc.publish(nats_subject(device_id, "ack"), str(last_seq).encode()))
                return
            except Exception as error:
                self.counters.failed += 1
                if self._stopping.is_set():
                    return  # left unacknowledged: the next holder gets it first
                await quietly(message.in_progress())  # still ours: no redelivery meanwhile
                log.warning("splitter: batch on %s not forwarded yet (%r); retrying", message.subject, error)
                await self._sleep_unless_stopping(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _split(self, message: Msg) -> tuple[str, int]:
        """Forward one batch in order, then move the device's mark.

        Returns the device id and the last sequence now stored.
        """
        assert self._state is not None
        device_id = message.subject.split(".")[1]
        try:
            entry = await self._state.get(device_id)
            revision = entry.revision or 0
            try:
                state = ForwardingState.from_json(entry.value or b"")
            except ValueError:
                state = ForwardingState(id=device_id)
        except KeyNotFoundError:
            state, revision = ForwardingState(id=device_id), 0
        try:
            batch = ReadingBatch.parse(message.data)
        except MalformedPayload as bad:
            state.malformed += 1
            self.counters.malformed += 1
            log.warning("device %s: malformed batch (%s): %r", device_id, bad.args[0], message.data[:120])
            await self._save(device_id, state, revision)
            return device_id, state.last_seq
        subject = nats_subject(device_id, "telemetry")
        fresh = [record for record in batch.records if record.seq > state.last_seq]
        # Published back to back, acknowledged together: one connection keeps
        # them in order. The message id makes a retry after a partial
        # failure harmless.
        acks = [
            await self.js.publish_async(subject, record.raw, headers={"Nats-Msg-Id": f"{device_id}:{record.seq}"})
            for record in fresh
        ]
        await asyncio.wait_for(asyncio.gather(*acks), self.config.publish_timeout)
        duplicates = len(batch.records) - len(fresh)
        if batch.dropped > state.dropped:
            # The board's flash budget ran out: the lost readings sit between
            # the last one stored before this batch and its first record.
            gap = {"after_seq": state.last_seq, "dropped": batch.dropped - state.dropped}
            state.gaps = [*state.gaps, gap][-_GAPS_KEPT:]
            state.dropped = batch.dropped
        if fresh:
            state.last_seq = fresh[-1].seq
        state.forwarded += len(fresh)
        state.duplicates += duplicates
        state.malformed += batch.malformed
        state.backlog = batch.backlog
        state.batches += 1
        await self._save(device_id, state, revision)
        self.counters.batches += 1
        self.counters.forwarded += len(fresh)
        self.counters.duplicates += duplicates
        self.counters.malformed += batch.malformed
        return device_id, state.last_seq

    async def _save(self, device_id: str, state: ForwardingState, revision: int) -> None:
        assert self._state is not None
        if revision == 0:
            await self._state.create(device_id, state.to_bytes())
        else:
            await self._state.update(device_id, state.to_bytes(), last=revision)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass


__all__ = [
    "BatchSplitter",
    "SPLITTER_CONSUMER",
    "SplitterConfig",
    "SplitterCounters",
    "batch_stream_config",
]
