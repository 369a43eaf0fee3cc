# Store-and-forward log on flash: readings are appended here first, online
# or not, and forwarded from here oldest first.
#
# Layout (in `folder`): segment files NNNNNNNN.seg holding records
#   [length: u16 LE][crc32 of body: u32 LE][body]
# and cursor.json, the position of the first record not yet acknowledged by
# the broker, replaced atomically (write, then rename).
#
# Flash-aware: LittleFS rewrites the last block of a file on every sync, so
# records are gathered in RAM and written every `flush_records` records or
# `flush_ms` milliseconds, whichever comes first (or when the RAM buffer,
# `pending_bytes`, is full). A power cut loses at most
# the unflushed records; a torn record at the end of a segment fails its
# CRC and is never forwarded. Every boot starts a fresh segment, so a torn
# tail is never appended to.
#
# next_batch() hands out flushed records first, then the ones still in RAM:
# while the link keeps up, a reading the broker acknowledges before its
# flush is due is never written to flash at all. A batch is put in the read
# area, records back to back as they are framed on flash, in one read (RAM
# records are copied there): the device lends the log the part of its
# packet buffer where a batch's payload goes, and lays the records out as
# JSON where they lie, so a batch is never copied on its way out.
import binascii
import json
import os
import struct
from micropython import const
from time import ticks_diff, ticks_ms

from state import write_atomic

_HEADER = const(6)
_MAX_RECORD = const(1024)
_CURSOR = "cursor.json"


def _name(number):
    return "%08d.seg" % number


# A batch's token (next_batch, for ack): (position after it on flash, or
# None for readings from RAM; its count; where they end in RAM; flushes).
def token_position(token):
    # Where the batch after this one starts; None: it is from RAM.
    return token[0]


def token_count(token):
    return token[1]


def area_size(batch_bytes):
    # A read area for batches of batch_bytes: room for the headers of
    # records of 48 bytes and more, and never less than one whole record.
    return max(batch_bytes + batch_bytes // 8, _HEADER + _MAX_RECORD)


class BacklogLog:
    def __init__(self, folder="log", budget=256 * 1024, segment_size=16 * 1024, flush_records=16, flush_ms=1000,
                 pending_bytes=2048, batch_bytes=4096, read_area=None):
        self.folder = folder
        self.budget = budget
        self.segment_size = segment_size
        self.flush_records = flush_records
        self.flush_ms = flush_ms
        # Records gathered in RAM, not yet on flash: pending[pending_start:
        # pending_len]. Allocated once: recording then never asks the heap
        # for a growing block, which a heap fragmented by a busy forwarder
        # cannot always give (readings were lost to MemoryError that way).
        # 2 KB: 11 readings of the board's own telemetry, so at high rates
        # the buffer, not flush_records, may set when they go to flash.
        self.pending = bytearray(max(pending_bytes, _HEADER + _MAX_RECORD))
        self._pending_view = memoryview(self.pending)
        self.pending_start = 0  # records before it were acknowledged from RAM
        self.pending_len = 0
        self.pending_count = 0
        self.pending_since = 0
        self.dropped = 0  # records lost to the budget or a full filesystem (persisted)
        self.corrupt = 0  # records skipped at boot for a bad length or CRC
        self.flash_bytes = 0  # bytes written to flash since boot, records and cursor
        self.records_flushed = 0
        self.unsent = 0  # flushed records not yet acknowledged
        self.flushes = 0  # a RAM batch handed out before a flush is stale after it
        self._corrupt_at = None
        # The read area (a memoryview): where next_batch() puts a batch, and
        # where counting reads. Given by the device (part of its packet
        # buffer), or the log's own: batch_bytes of records with room for
        # their headers, and never less than one record of the largest size.
        # Allocated once, here, like the RAM buffer: asked for at the first
        # backlog, on a heap fragmented by then, a block this size was not
        # always there (seen in a soak).
        self.area = None
        self._area_size = area_size(batch_bytes)
        if read_area is not None:
            if len(read_area) < _HEADER + _MAX_RECORD:
                raise ValueError("a read area holds at least one record")
            self.area = memoryview(read_area)
        else:
            try:
                self._area_for()
            except MemoryError:
                # Not now (after a soft reboot the last boot's objects may
                # not be collected yet): asked for again at the first read.
                pass
        try:
            os.mkdir(folder)
        except OSError:
            pass  # already there
        self.segments = sorted(int(n[:8]) for n in os.listdir(folder) if n.endswith(".seg"))
        self.seg, self.off = self._load_cursor()
        if self.segments and self.seg < self.segments[0]:
            self.seg, self.off = self.segments[0], 0
        # A new segment per boot: never append after a possibly torn tail.
        self.active = (self.segments[-1] + 1) if self.segments else max(1, self.seg)
        self.active_size = 0
        for number in self.segments:
            if number >= self.seg:
                self.unsent += self._count(number, self.off if number == self.seg else 0)

    def backlog(self):
        # Readings recorded and not yet acknowledged by the broker.
        return self.unsent + self.pending_count

    # -- recording ---------------------------------------------------------------
    def append(self, body):
        # Never blocks on the network: a full flash drops the oldest data,
        # counted, rather than the newest. Raises ValueError for a record
        # over _MAX_RECORD, MemoryError when the heap is exhausted.
        n = len(body)
        if n > _MAX_RECORD:
            raise ValueError("record of %d bytes is over %d" % (n, _MAX_RECORD))
        if self.pending_len + _HEADER + n > len(self.pending):
            self.flush()  # the buffer is full: out to flash first
        if not self.pending_count:
            self.pending_since = ticks_ms()
        at = self.pending_len
        struct.pack_into("<HI", self.pending, at, n, binascii.crc32(body))
        self.pending[at + _HEADER:at + _HEADER + n] = body
        # Counted only now, whole: if anything above fails, the record is
        # not in the log, never a header without its body.
        self.pending_len = at + _HEADER + n
        self.pending_count += 1
        if self.pending_count >= self.flush_records:
            try:
                self.flush()
            except MemoryError:
                pass  # the record is kept, in RAM: the next flush writes it

    def flush_due(self):
        return self.pending_count and ticks_diff(ticks_ms(), self.pending_since) >= self.flush_ms

    def flush(self):
        if not self.pending_count:
            return
        size = self.pending_len - self.pending_start
        if self.active_size and self.active_size + size > self.segment_size:
            self.active += 1
            self.active_size = 0
        self._make_room(size)
        for attempt in range(2):
            try:
                self._write_active()
                break
            except OSError:  # ENOSPC or a failing flash
                # The failed write may have left a torn tail: keep that file
                # as a segment (its good records still count) and go on in
                # a fresh one, after freeing the oldest once.
                self._seal_torn_active()
                if attempt or not self._drop_oldest():
                    self.dropped += self.pending_count
                    break
        self._clear_pending()

    def _seal_torn_active(self):
        try:
            os.stat(self._path(self.active))
            if not self.segments or self.segments[-1] != self.active:
                self.segments.append(self.active)
        except OSError:
            pass  # nothing was written
        self.active += 1
        self.active_size = 0

    def _write_active(self):
        size = self.pending_len - self.pending_start
        with open(self._path(self.active), "ab") as f:
            f.write(memoryview(self.pending)[self.pending_start:self.pending_len])
        if not self.segments or self.segments[-1] != self.active:
            self.segments.append(self.active)
        self.active_size += size
        self.flash_bytes += size
        self.records_flushed += self.pending_count
        self.unsent += self.pending_count
        self.flushes += 1

    def _clear_pending(self):
        self.pending_start = self.pending_len = 0
        self.pending_count = 0

    def _make_room(self, incoming):
        while self.segments and self.stored_bytes() + incoming > self.budget:
            if not self._drop_oldest():
                break

    def _drop_oldest(self):
        # Drops the oldest segment (never the one being appended to), counting
        # the records in it that were not yet forwarded.
        if not self.segments or self.segments[0] == self.active:
            return False
        oldest = self.segments[0]
        unsent = oldest >= self.seg
        # Counted before anything changes: counting reads, and a read that
        # fails for want of heap must leave the log as it was.
        lost = self._count(oldest, self.off if oldest == self.seg else 0) if unsent else 0
        self.segments.pop(0)
        if unsent:
            self.dropped += lost
            self.unsent -= lost
            self.seg, self.off = (self.segments[0] if self.segments else self.active), 0
            self._save_cursor()
        self._remove(oldest)
        return True

    def stored_bytes(self):
        total = 0
        for number in self.segments:
            try:
                total += os.stat(self._path(number))[6]
            except OSError:
                pass  # already gone
        return total

    def _remove(self, number):
        try:
            os.remove(self._path(number))
        except OSError:
            pass  # already gone

    # -- forwarding ----------------------------------------------------------------
    def next_batch(self, max_bytes, start=None):
        # (count, size, token): the oldest unacknowledged records, flushed
        # ones first, in area[:size] as they are framed on flash, at most max_bytes of bodies (the first one always
        # goes); pass the token to ack() once the broker has them all.
        # `start` is the position in an earlier token: the batch after ones
        # still in flight, from flushed records only (records in RAM go
        # alone, when nothing else is in flight). The area is rewritten by
        # the next read: send the batch first.
        count, size, position = self.read_batch(max_bytes, start)
        if count:
            return count, size, (position, count, 0, 0)
        if start is not None:
            return 0, 0, None
        self.unsent = 0  # everything readable on flash is acknowledged
        area = self._area_for()
        pending = self.pending
        used = 0
        at = first = self.pending_start
        while at < self.pending_len:
            n = pending[at] | (pending[at + 1] << 8)
            if count and (used + n > max_bytes or at + _HEADER + n - first > len(area)):
                break
            used += n
            at += _HEADER + n
            count += 1
        area[: at - first] = self._pending_view[first:at]
        return count, at - first, (None, count, at, self.flushes)

    def ack(self, token, count=None):
        # The broker has the batch of `token`; with `count`, and the batches
        # from flash before it not yet acknowledged: `count` records in all.
        position, ram_end = token[0], token[2]
        if count is None:
            count = token[1]
        if position is not None:
            self.commit(position, count)
        elif token[3] != self.flushes:
            pass  # flushed meanwhile: they are on flash now and go again from there
        elif count:
            # Acknowledged straight from RAM: these never need to reach flash.
            self.pending_start = ram_end
            self.pending_count -= count
            if not self.pending_count:
                self._clear_pending()

    def read_batch(self, max_bytes, start=None):
        # Returns (count, size, position after them): `count` records read
        # into area[:size], from the cursor or from `start` when that is
        # past it. Only flushed records are read; the caller flushes first
        # when it wants everything.
        count = 0
        used = 0
        filled = 0
        seg, off = self.seg, self.off
        if start is not None and start > (seg, off):
            seg, off = start
        while True:
            if seg not in self.segments:
                later = self._after(seg)
                if later is None:
                    break
                seg, off = later, 0
            off, used, filled, got, ended = self._scan(seg, off, max_bytes, used, filled)
            count += got
            if not ended:
                break  # the batch or the buffer is full
            later = self._after(seg)
            if later is None or seg == self.active:
                break
            seg, off = later, 0
        return count, filled, (seg, off)

    def _area_for(self):
        area = self.area
        if area is None:
            area = self.area = memoryview(bytearray(self._area_size))
        return area

    def _scan(self, seg, off, max_bytes, used, filled):
        # Reads segment `seg` from `off` into the read area after its first
        # `filled` bytes, and keeps each good record there while the bodies
        # total at most max_bytes (the first one always goes). Returns (off,
        # used, filled, count, ended) after them: ended is True when the
        # segment has no more good records (its end, or a torn or corrupt
        # record, counted once), False when the batch or the area is full.
        # One read per call, not two per record.
        area = self._area_for()
        try:
            with open(self._path(seg), "rb") as f:
                if f.seek(0, 2) <= off:
                    return off, used, filled, 0, True  # read to its end (online, the usual case)
                f.seek(off)
                got = f.readinto(area[filled:])
        except OSError:  # lost or unreadable: go on with the next one
            return off, used, filled, 0, True
        at_end = filled + got < len(area)  # a short read: the segment's end is in the area
        end = filled + got
        p = filled
        count = 0
        while True:
            left = end - p
            if left < _HEADER:
                return off, used, p, count, at_end  # a torn header at the end is not a record
            n = area[p] | area[p + 1] << 8
            if n > _MAX_RECORD or (at_end and _HEADER + n > left):
                self._count_corrupt(seg, off, n)  # torn, or a length no record has
                return off, used, p, count, True
            if _HEADER + n > left or (p and used + n > max_bytes):
                return off, used, p, count, False
            crc = area[p + 2] | area[p + 3] << 8 | area[p + 4] << 16 | area[p + 5] << 24
            if binascii.crc32(area[p + _HEADER : p + _HEADER + n]) != crc:
                self._count_corrupt(seg, off, n)
                return off, used, p, count, True
            count += 1
            used += n
            p += _HEADER + n
            off += _HEADER + n

    def _count_corrupt(self, seg, off, n):
        # Counted once per record, however often it is read.
        at = (seg, off, n)
        if at != self._corrupt_at:
            self._corrupt_at = at
            self.corrupt += 1

    def _after(self, seg):
        for number in self.segments:
            if number > seg:
                return number
        return None

    def commit(self, position, count=0):
        # The broker acknowledged everything before `position` (`count`
        # records since the last commit): persist the cursor, then delete
        # segments that are wholly behind it. A position behind the cursor
        # means the budget dropped those records while they were in flight
        # (already counted as dropped): nothing to do.
        if position <= (self.seg, self.off):
            return
        self.seg, self.off = position
        self.unsent = max(0, self.unsent - count)
        self._save_cursor()
        while self.segments and self.segments[0] < self.seg:
            self._remove(self.segments.pop(0))

    def _count(self, seg, off):
        # Good records in segment `seg` from `off`.
        count = 0
        ended = False
        while not ended:
            off, _, _, got, ended = self._scan(seg, off, 1 << 30, 0, 0)
            count += got
        return count

    def _path(self, number):
        return self.folder + "/" + _name(number)

    def _load_cursor(self):
        try:
            with open(self.folder + "/" + _CURSOR) as f:
                saved = json.load(f)
            self.dropped = int(saved.get("dropped", 0))
            return int(saved["seg"]), int(saved["off"])
        except (OSError, ValueError, KeyError, TypeError):
            return (self.segments[0] if self.segments else 1), 0

    def _save_cursor(self):
        text = '{"seg": %d, "off": %d, "dropped": %d}' % (self.seg, self.off, self.dropped)
        try:
            write_atomic(self.folder + "/" + _CURSOR, text)
            self.flash_bytes += len(text)
        except OSError:
            pass  # forwarded again after a reboot; the host de-duplicates by sequence
