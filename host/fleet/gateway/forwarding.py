"""Store-and-forward, host side: batches from the boards' logs into one
telemetry message per reading, exactly once and in order.

A board forwards its flash log oldest first as QoS 1 messages on
fleet/<id>/batch. The stream FLEET_BATCHES captures them by itself (nothing is
lost while no gateway runs). The splitter reads that stream through a durable
pull consumer, a round of up to `round_batches` batches at a time, and
publishes each record to fleet.<id>.telemetry, where FLEET_TELEMETRY stores
it. Exactly once rests on three things:

- a per-device high-water mark, the last sequence stored: the board's
  sequence only grows and its log is sent in order, so a record at or below
  the mark is a batch sent again after a lost PUBACK, however long after.
  The lease holder keeps the marks in memory; it reads one from the stream
  itself (the device's last stored reading) and from the KV bucket
  `fleet_forwarding`, whichever is higher, whenever it has no good copy;
- a round's records are published back to back as a chain: each names the
  record before it (`Nats-Expected-Last-Msg-Id`), so the stream stores a
  record only right after its predecessor, and the ack of the last one
  stands for the whole round. A round that fails leaves a stored prefix,
  and the marks, read again from the stream, say exactly where it ends;
- a JetStream message id `<id>:<seq>` on every record, so a holder that
  lost its lease without knowing it cannot store a record twice inside the
  stream's duplicate window.

A board keeps several batches in flight, and each says which sequence the
batch before it ended with (`prev`). A batch whose `prev` is past the mark
follows one that never reached the stream (nats-server acknowledged it,
then stopped): nothing in it is stored, and the board, never acked, sends
again from its cursor.

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
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, ConnectionReconnectingError
from nats.js import JetStreamContext, api
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from fleet.broker.jetstream import bucket_keys, device_stream, ensure_bucket, quietly
from fleet.protocol import BATCH_STREAM, FORWARDING_BUCKET, LEASE_BUCKET, TELEMETRY_STREAM, nats_subject
from fleet.wire import ForwardingState, MalformedPayload, ReadingBatch, TelemetryReading

log = logging.getLogger(__name__)

SPLITTER_CONSUMER = "fleet-gateway-splitter"
_LEASE_KEY = "splitter"
_GAPS_KEPT = 16


def _parse_batch(data: bytes) -> ReadingBatch | MalformedPayload:
    try:
        return ReadingBatch.parse(data)
    except MalformedPayload as bad:
        return bad


# A batch as fetched: the message, and what it parsed into (or why not).
_Fetched = tuple[Msg, ReadingBatch | MalformedPayload]


class ChainBroken(Exception):
    """The stream refused the last record of a chain: something before it is missing."""


@dataclass(frozen=True)
class SplitterConfig:
    batch_max_age: float = 7 * 24 * 3600.0  # seconds a batch stays in FLEET_BATCHES
    duplicate_window: float = 120.0
    fetch_wait: float = 1.0
    round_batches: int = 64  # batches fetched and split together
    publish_timeout: float = 5.0  # for the stream's ack of a round's last record
    save_every: float = 0.5  # seconds between saves of the per-device state in the bucket
    ack_wait: float = 10.0  # a holder that died: its batch goes to the next one after this
    lease_ttl: float = 6.0  # a stopped or frozen holder is replaced after this


@dataclass
class SplitterCounters:
    batches: int = 0
    forwarded: int = 0
    duplicates: int = 0
    malformed: int = 0
    holes: int = 0  # batches after one that never reached the stream: left for the board to resend
    failed: int = 0  # rounds that failed and were retried (JetStream unavailable)


@dataclass
class DeviceRound:
    """What one round did for one device: the registry's news."""

    seen_at: float  # JetStream timestamp of the device's newest batch in the round
    newest: TelemetryReading | None = None  # its newest reading now stored
    newest_stream_seq: int = 0  # that reading's sequence in FLEET_TELEMETRY
    malformed: list[str] = field(default_factory=list)  # why each bad batch or record was left out


def batch_stream_config(config: SplitterConfig) -> api.StreamConfig:
    return device_stream(
        BATCH_STREAM,
        "readings forwarded from the boards' flash logs, several per message",
        "batch",
        max_age=config.batch_max_age,
        duplicate_window=config.duplicate_window,
    )


async def publish_chain(
    nc: Client, records: list[tuple[str, bytes, str]], after: str | None, timeout: float
) -> tuple[str, int]:
    """Store `records` (subject, body, message id) in order, with one ack
    for all of them; returns the last one's message id and stream sequence.
    The chain makes the records contiguous in the stream: the one `k` places
    before the last has sequence `last - k`.

    Each record names the one before it (`Nats-Expected-Last-Msg-Id`; the
    first names `after`, the message id of what the stream holds last, when
    known), so the stream refuses a record whose predecessor is not the
    last message stored: one that was lost makes every later one fail, the
    last one included, and that one asks for the stream's answer.
    """
    if not records:
        return after or "", 0
    # All but the last go out as HPUB commands written here, in one piece, on
    # nats-py's pending buffer (written in order before the request that
    # follows): its publish() re-checks and re-encodes headers on every call,
    # which was most of the gateway's cost per reading (docs/BENCHMARKS.md).
    # The subjects and message ids are the gateway's own: nothing to check.
    commands: list[bytes] = []
    previous = after
    for subject, body, message_id in records[:-1]:
        commands.append(_hpub(subject, body, message_id, previous))
        previous = message_id
    if commands:
        # nats-py's publish() refuses to queue past its pending limit while
        # reconnecting; this does not check it, so it queues nothing then
        # (the round is tried again once the connection is back).
        if nc.is_closed:
            raise ConnectionClosedError
        if not nc.is_connected:
            raise ConnectionReconnectingError
        await nc._send_command(b"".join(commands))  # pyright: ignore[reportPrivateUsage]
    subject, body, message_id = records[-1]
    headers = {"Nats-Msg-Id": message_id}
    if previous is not None:
        headers["Nats-Expected-Last-Msg-Id"] = previous
    reply = await nc.request(subject, body, headers=headers, timeout=timeout)
    answer = json.loads(reply.data)
    if not isinstance(answer, dict) or answer.get("error") or answer.get("duplicate"):
        # Refused, or a duplicate, whose ack says nothing about the
        # records before it.
        raise ChainBroken(str(answer.get("error") if isinstance(answer, dict) else answer))
    return message_id, int(answer.get("seq", 0))


def _hpub(subject: str, body: bytes, message_id: str, previous: str | None) -> bytes:
    """One NATS HPUB command: a message with its id and, when known, the id
    of the one the stream must hold last."""
    if previous is None:
        header = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % message_id.encode()
    else:
        header = b"NATS/1.0\r\nNats-Msg-Id: %s\r\nNats-Expected-Last-Msg-Id: %s\r\n\r\n" % (
            message_id.encode(),
            previous.encode(),
        )
    return b"HPUB %s %d %d\r\n%s%s\r\n" % (subject.encode(), len(header), len(header) + len(body), header, body)


class BatchSplitter:
    """Runs inside a gateway; only the lease holder splits."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        config: SplitterConfig,
        on_round: Callable[[dict[str, DeviceRound]], None] | None = None,
    ) -> None:
        self.nc = nc
        self.js = js
        self.config = config
        # Told, after each round is stored, what it did per device: the
        # registry learns the newest readings here rather than by reading
        # every stored one back from the stream.
        self.on_round = on_round
        self.counters = SplitterCounters()
        self.instance = uuid.uuid4().hex[:12]
        self.leader = False
        self._state: KeyValue | None = None
        self._leases: KeyValue | None = None
        self._lease_revision = 0
        self._task: asyncio.Task[None] | None = None
        # device id -> (state, its revision in the bucket); good only while
        # this instance holds the lease and its last round went through.
        self._marks: dict[str, tuple[ForwardingState, int]] = {}
        self._unsaved: set[str] = set()  # devices whose state in the bucket is behind
        self._verify: set[str] = set()  # devices whose mark the stream may have passed
        self._last_id: str | None = None  # message id of the last record this holder stored
        self._saved_at = 0.0
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
                # The round in hand and the next, fetched meanwhile (order: see _run).
                max_ack_pending=2 * self.config.round_batches,
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
        if self.leader:
            await self._save_quietly()
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
        """The device's state: this holder's own copy when it has one (the
        bucket is up to save_every behind), else the bucket's."""
        cached = self._marks.get(device_id) if self.leader else None
        if cached is not None:
            return cached[0].copy()
        return (await self._load(device_id))[0]

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
                self._forget()  # whatever was known before is stale now
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
        next_round: asyncio.Task[list[_Fetched]] | None = None
        while not self._stopping.is_set():
            if loop.time() - renewed >= renew_every:
                await self._hold_lease()
                renewed = loop.time()
            if not self.leader:
                if next_round is not None:
                    next_round.cancel()  # the new holder gets its batches
                    next_round = None
                self._forget()  # another holder moves them meanwhile
                await self._sleep_unless_stopping(renew_every)
                continue
            try:
                # Batches come in stream order, and redeliveries in order
                # too; a round is acknowledged as a whole only once all of
                # it is stored, so no batch overtakes an earlier one even
                # across a failure or a change of lease holder.
                round_ = await (next_round or self._fetch_round(subscription, renew_every))
            except asyncio.TimeoutError:
                await self._save_quietly()  # idle: bring the bucket up to date
                continue
            except Exception as error:
                if self._stopping.is_set():
                    break
                log.warning("splitter: fetch failed (%r)", error)
                await self._sleep_unless_stopping(1.0)
                continue
            finally:
                next_round = None
            if round_:
                # The next round is fetched and parsed while this one's
                # records are stored (the wait for the stream's ack is most
                # of a round's idle time); it is split only after this one
                # is. Should this one be retried for longer than ack_wait,
                # the server delivers the next one's batches again: the marks
                # make the second copy a duplicate, stored nowhere.
                next_round = asyncio.create_task(self._fetch_round(subscription, renew_every))
                await self._split_until_done(round_)
        if next_round is not None:
            next_round.cancel()  # its batches go to the next holder, unacknowledged

    async def _fetch_round(self, subscription: JetStreamContext.PullSubscription, wait: float) -> list[_Fetched]:
        messages = await subscription.fetch(self.config.round_batches, timeout=min(self.config.fetch_wait, wait))
        return [(message, _parse_batch(message.data)) for message in messages]

    def _forget(self) -> None:
        """Drop every state held in memory, saved or not: read them again."""
        self._marks.clear()
        self._unsaved.clear()

    async def _save_quietly(self) -> None:
        try:
            await self._save_due(now=True)
        except KeyWrongLastSequenceError:
            # Another writer: what this instance knows is stale.
            log.warning("splitter: the forwarding state was changed by another writer; reading it again")
            self._forget()
        except Exception as error:
            log.debug("splitter: saving the forwarding state: %r", error)  # JetStream away: later

    async def _split_until_done(self, round_: list[_Fetched]) -> None:
        # A failure here is JetStream being unavailable (a broker restart):
        # try the same round again rather than let a later one overtake it.
        backoff = 0.2
        attempts = 0
        while True:
            try:
                stored, news = await self._split(round_)
            except Exception as error:
                attempts += 1
                self.counters.failed += 1
                # A prefix of the round's records may be stored: check
                # the marks against the stream before trusting them again.
                self._verify.update(self._marks)
                if isinstance(error, KeyWrongLastSequenceError):
                    self._forget()  # another writer changed the bucket: read it again
                if self._stopping.is_set():
                    return  # left unacknowledged: the next holder gets it first
                if isinstance(error, ChainBroken) and attempts == 1:
                    continue  # the marks were behind the stream; read again, they are not
                log.warning("splitter: %d batches not forwarded yet (%r); retrying", len(round_), error)
                for message, _ in round_:
                    await quietly(message.in_progress())  # still ours: no redelivery meanwhile
                await self._sleep_unless_stopping(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for message, _ in round_:
                await quietly(message.ack())
            # A board moves its log on only when it hears this: sent for
            # duplicates and holes too, so a board that missed one catches up.
            for device_id, last_seq in stored.items():
                await quietly(self.nc.publish(nats_subject(device_id, "ack"), str(last_seq).encode()))
            if self.on_round is not None:
                self.on_round(news)
            return

    async def _split(self, round_: list[_Fetched]) -> tuple[dict[str, int], dict[str, DeviceRound]]:
        """Forward a round of batches in order, then move the devices' marks.

        Returns the last sequence now stored for every device in the round,
        and what the round did for each.
        """
        records: list[tuple[str, bytes, str]] = []  # subject, body, message id
        touched: dict[str, ForwardingState] = {}
        news: dict[str, DeviceRound] = {}
        newest_at: dict[str, tuple[int, TelemetryReading]] = {}  # device id -> its newest reading, index in records
        gaps_before: dict[str, int] = {}
        forwarded = duplicates = malformed = holes = 0
        for message, batch in round_:
            device_id = message.subject.split(".")[1]
            state = touched.get(device_id)
            if state is None:
                state = touched[device_id] = await self._mark(device_id)
                gaps_before[device_id] = len(state.gaps)
            state.batches += 1
            seen = news.get(device_id)
            if seen is None:
                seen = news[device_id] = DeviceRound(0.0)
            seen.seen_at = message.metadata.timestamp.timestamp()
            if isinstance(batch, MalformedPayload):
                state.malformed += 1
                malformed += 1
                seen.malformed.append(str(batch.args[0]))
                log.warning("device %s: malformed batch (%s): %r", device_id, batch.args[0], message.data[:120])
                continue
            seen.malformed.extend(["a record is not a reading"] * batch.malformed)
            if batch.prev > state.last_seq:
                # The batch before this one never reached the stream: store
                # nothing past the hole; the board sends both again.
                holes += 1
                state.holes += 1
                continue
            subject = nats_subject(device_id, "telemetry")
            fresh = [record for record in batch.records if record.seq > state.last_seq]
            records.extend((subject, record.raw, f"{device_id}:{record.seq}") for record in fresh)
            if batch.dropped > state.dropped:
                # The board's flash budget ran out: the lost readings sit between
                # the last one stored before this batch and its first record.
                gap = {"after_seq": state.last_seq, "dropped": batch.dropped - state.dropped}
                state.gaps = [*state.gaps, gap][-_GAPS_KEPT:]
                state.dropped = batch.dropped
            if fresh:
                state.last_seq = fresh[-1].seq
                newest_at[device_id] = (len(records) - 1, fresh[-1].reading)
            state.forwarded += len(fresh)
            state.duplicates += len(batch.records) - len(fresh)
            state.malformed += batch.malformed
            state.backlog = batch.backlog
            forwarded += len(fresh)
            duplicates += len(batch.records) - len(fresh)
            malformed += batch.malformed
        if records:
            try:
                self._last_id, last_stream_seq = await publish_chain(
                    self.nc, records, self._last_id, self.config.publish_timeout
                )
            except BaseException:
                self._last_id = None  # what the stream holds last is unknown now
                raise
            for device_id, (index, reading) in newest_at.items():
                news[device_id].newest = reading
                news[device_id].newest_stream_seq = last_stream_seq - (len(records) - 1 - index)
        for device_id, state in touched.items():
            self._marks[device_id] = (state, self._marks[device_id][1])
            self._verify.discard(device_id)
            self._unsaved.add(device_id)
            if len(state.gaps) != gaps_before[device_id]:
                await self._save(device_id, state)  # a gap is saved at once, not only counted
        await self._save_due()
        counters = self.counters
        counters.batches += len(round_)
        counters.forwarded += forwarded
        counters.duplicates += duplicates
        counters.malformed += malformed
        counters.holes += holes
        return {device_id: state.last_seq for device_id, state in touched.items()}, news

    async def _mark(self, device_id: str) -> ForwardingState:
        """A copy of the device's forwarding state, its mark no lower than
        the stream's when there is reason to doubt it."""
        cached = self._marks.get(device_id)
        if cached is None:
            loaded, revision = await self._load(device_id)
            cached = self._marks[device_id] = (loaded or ForwardingState(id=device_id), revision)
        elif device_id not in self._verify:
            return cached[0].copy()
        state = cached[0].copy()
        # The stream has the last word: a holder that stopped between
        # storing a round and saving the marks left the bucket behind, and a
        # round that failed may have stored a prefix of its records.
        try:
            last = await self.js.get_last_msg(TELEMETRY_STREAM, nats_subject(device_id, "telemetry"))
            state.last_seq = max(state.last_seq, TelemetryReading.parse(last.data or b"").seq)
        except NotFoundError:
            pass  # nothing of this device in the stream (yet, or any more)
        except MalformedPayload:
            pass  # not something the splitter stored
        return state

    async def _load(self, device_id: str) -> tuple[ForwardingState | None, int]:
        """The device's state in the bucket (None: none, or unreadable) and
        the revision to update."""
        assert self._state is not None
        try:
            entry = await self._state.get(device_id)
        except KeyNotFoundError:
            return None, 0
        try:
            return ForwardingState.from_json(entry.value or b""), entry.revision or 0
        except ValueError:
            return None, entry.revision or 0

    async def _save_due(self, now: bool = False) -> None:
        # The bucket holds counts for people and the mark for the next
        # holder, who also reads the stream: saved every save_every
        # seconds, not per round, which would cost a round trip each.
        loop = asyncio.get_running_loop()
        if not self._unsaved or not (now or loop.time() - self._saved_at >= self.config.save_every):
            return
        for device_id in list(self._unsaved):
            cached = self._marks.get(device_id)
            if cached is not None:
                await self._save(device_id, cached[0])
        self._saved_at = loop.time()

    async def _save(self, device_id: str, state: ForwardingState) -> None:
        assert self._state is not None
        _, revision = self._marks.get(device_id, (state, 0))
        if revision == 0:
            revision = await self._state.create(device_id, state.to_bytes())
        else:
            revision = await self._state.update(device_id, state.to_bytes(), last=revision)
        self._marks[device_id] = (state, revision)
        self._unsaved.discard(device_id)

    async def _sleep_unless_stopping(self, seconds: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except asyncio.TimeoutError:
            pass


__all__ = [
    "BatchSplitter",
    "ChainBroken",
    "DeviceRound",
    "SPLITTER_CONSUMER",
    "SplitterConfig",
    "SplitterCounters",
    "batch_stream_config",
    "publish_chain",
]
