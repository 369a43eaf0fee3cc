# Store-and-forward, the sending half: readings go from the flash log to
# the broker, oldest first, several to a QoS 1 message, and the log moves
# on only when the gateway says they are stored. How this makes each
# reading arrive exactly once: docs/ARCHITECTURE.md, "Exactly once".
import asyncio
from micropython import const
from time import ticks_add, ticks_diff, ticks_ms

from backlog import token_count, token_position
from link import HEADER_ROOM

# Room for a batch's JSON envelope, in front of its records (lay_out).
_ENVELOPE_ROOM = const(128)
# A batch takes at most this part of the heap: its packet buffer is the
# board's largest block, held for good. The default 4 KB batches need a
# 128 KB heap (a Pico W has 150-190 KB); on a 64 KB heap they are 2 KB.
_HEAP_PER_BATCH = const(32)


def batch_bytes_for(wanted, heap):
    # The batch_bytes setting, or less on a heap too small for it (but
    # never under 1 KB): see _HEAP_PER_BATCH.
    return min(wanted, max(1024, heap // _HEAP_PER_BATCH))


def payload_offset(topic):
    # Where a batch's records start in the packet buffer: after room for
    # the packet's header (the topic included) and the batch's envelope.
    return HEADER_ROOM + len(topic) + _ENVELOPE_ROOM


def seq_of(packet, start, end):
    # The "seq" of the record in packet[start:end] as record() wrote it,
    # without parsing it all (or copying it).
    at = packet.find(b'"seq": ', start, end) + 7
    seq = 0
    while 48 <= packet[at] <= 57:
        seq = seq * 10 + packet[at] - 48
        at += 1
    return seq


class Forwarder:
    # `packet` is the buffer the link gathers every packet in; the log reads
    # a batch into it from `payload_at` on (its read_area), and the batch
    # is sent from where it lies: no copy, no heap of its own.
    def __init__(self, link, backlog, packet, payload_at, topic, settings, batch_bytes, log):
        self.link = link
        self.backlog = backlog
        self.packet = packet
        self.payload_at = payload_at
        self.topic = topic
        self.settings = settings  # forward_window and ack_timeout_ms, read at each pass
        self.batch_bytes = batch_bytes
        self.log = log
        self.recorded = asyncio.Event()  # something to send: a reading, a new connection, a flush
        self.stored = asyncio.Event()  # the gateway acknowledged a batch (or tick(): look again)
        self.stored_seq = -1  # the last sequence the gateway says is stored
        self.forwarded = 0  # readings acknowledged this boot
        self.errors = 0  # passes that failed and were survived
        self._woke = ticks_ms()

    def wake(self):
        self.recorded.set()

    def acked(self, payload):
        # The gateway's ack: the last seq now in the telemetry stream.
        # Length first: int()'s error for a bad payload holds a copy of all
        # of it, which the heap of a board sent 4 KB may not have room for.
        seq = None
        if payload and len(payload) <= 20:  # None: dropped unread (see mqttsocket)
            try:
                seq = int(payload)
            except ValueError:
                pass
        if seq is None:
            self.log("ack: not a sequence number: %r" % (payload[:32] if payload else payload,))
        elif seq > self.stored_seq:
            self.stored_seq = seq
            self.stored.set()

    def tick(self):
        # On the device's clock: whoever waits for an ack notices a timeout
        # or a link gone, and every flush_ms the forwarder looks again.
        self.stored.set()
        now = ticks_ms()
        if ticks_diff(now, self._woke) >= self.backlog.flush_ms:
            self._woke = now
            self.recorded.set()

    async def run(self):
        # Up to forward_window batches in flight. No ack in ack_timeout_ms:
        # everything in flight goes again from the log's cursor after a
        # growing pause (no gateway running). A PUBACK alone is not enough:
        # nats-server sends it before a stream has stored the message.
        log_ = self.backlog
        link = self.link
        resend_at = ticks_ms()
        misses = 0  # passes in a row without an ack: the pause before resending grows
        connects = link.connects
        while True:
            await self.recorded.wait()
            self.recorded.clear()
            if link.connects != connects:  # a new connection: send at once
                connects = link.connects
                resend_at = ticks_ms()
            try:
                resend_at, misses = await self.send_pass(self.batch_bytes, resend_at, misses)
            except Exception as e:  # never let the forwarder die: the log keeps everything
                self.errors += 1
                self.log("forward: %r" % (e,))
            if log_.flush_due():
                log_.flush()

    async def send_pass(self, limit, resend_at, misses):
        # One pass over the log while the link is up; returns the state run()
        # keeps between passes. A pass starts at the log's cursor, so
        # whatever was in flight when the last one ended goes again (the
        # gateway drops what it already stored).
        log_ = self.backlog
        link = self.link
        window = self.settings["forward_window"]
        ack_timeout = self.settings["ack_timeout_ms"]
        inflight = []  # (last seq, token, packet number) of each batch sent and not acked, oldest first
        sending = 0  # readings in those batches
        connects = link.connects
        while link.connected and ticks_diff(ticks_ms(), resend_at) >= 0:
            # Fill the window. Later batches carry the last seq of the one
            # before ("prev"): if that one never reached the stream, the
            # gateway sees the hole and stores nothing past it.
            while len(inflight) < window:
                start = token_position(inflight[-1][1]) if inflight else None
                if inflight and start is None:
                    break  # readings from RAM are in flight: they go alone
                count, size, token = log_.next_batch(limit, start)
                if not count:
                    break
                prev = inflight[-1][0] if inflight else -1
                sending += count
                begin, end, last = self.lay_out(size, prev, log_.backlog() - sending)
                # Not waiting for each PUBACK: the window is the flow control.
                number = link.send(self.topic, self.packet, begin, end)
                if not number:
                    return resend_at, misses  # the link is down; all of it goes again on the next connection
                inflight.append((last, token, number))
            if not inflight:
                break
            stored = await self._stored_up_to(inflight[0][0], inflight[0][2], connects, ack_timeout)
            if stored is None:
                break  # the link went down meanwhile
            if not stored:
                # The first miss is likely a lost message: resend at
                # once. More mean no gateway is storing: back off.
                pause = 0 if not misses else min(ack_timeout << min(misses - 1, 8), 60000)
                misses += 1
                resend_at = ticks_add(ticks_ms(), pause)
                self.log("forward: no ack for seq %d in %d ms; sending again in %d ms" % (inflight[0][0], ack_timeout, pause))
                break
            misses = 0
            # One cursor write for every batch this ack covers (the oldest
            # one at least: that is what was waited for).
            token = inflight.pop(0)[1]
            count = token_count(token)
            while inflight and inflight[0][0] <= self.stored_seq and inflight[0][2] <= link.pubacked:
                token = inflight.pop(0)[1]
                count += token_count(token)
            log_.ack(token, count)
            self.forwarded += count
            sending -= count
        return resend_at, misses

    async def _stored_up_to(self, seq, number, connects, timeout_ms):
        # True once the gateway has stored `seq` and the broker has
        # acknowledged the packet that carried it (send()'s `number`), False
        # after timeout_ms, None if the link went down first (connection
        # `connects` is the one the batch went on).
        link = self.link
        deadline = ticks_add(ticks_ms(), timeout_ms)
        while self.stored_seq < seq or link.pubacked < number:
            if not link.connected or link.connects != connects:
                return None
            left = ticks_diff(deadline, ticks_ms())
            if left <= 0:
                return False
            if self.stored_seq >= seq:
                # Only the PUBACK is missing: the gateway's ack came first,
                # for a copy sent before a reconnect. It is on its way.
                await asyncio.sleep_ms(1)
                continue
            # Woken by the ack, or by tick(): a link that drops, or the
            # timeout, is noticed then. Cheaper than asyncio.wait_for_ms,
            # whose task and closures cost each wait heap of their own.
            await self.stored.wait()
            self.stored.clear()
        return True

    def lay_out(self, size, prev, waiting):
        # The batch the log put in the packet buffer, records framed as on
        # flash ([length: u16][crc32: u32][body] each, in the `size` bytes
        # from payload_at), made the batch's JSON where it lies: each 6-byte
        # header becomes JSON whitespace and punctuation of the same length,
        # the envelope goes in front and "\n]}" after. One record per line:
        # the gateway takes each record's bytes as they are. `waiting`:
        # readings on the board after this batch and the ones in flight
        # before it. Returns (start, end) of the payload in the packet
        # buffer, and the last record's seq.
        packet = self.packet
        at = self.payload_at
        end = at + size
        head = b'{"prev": %d, "dropped": %d, "backlog": %d, "records": ' % (prev, self.backlog.dropped, max(0, waiting))
        packet[at - len(head):at] = head
        p = at
        while True:
            n = packet[p] | packet[p + 1] << 8
            packet[p:p + 6] = b",\n    " if p > at else b"[\n    "
            if p + 6 + n >= end:
                break
            p += 6 + n
        packet[end:end + 3] = b"\n]}"
        return at - len(head), end + 3, seq_of(packet, p + 6, end)
