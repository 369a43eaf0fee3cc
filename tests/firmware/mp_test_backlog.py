# The store-and-forward log: order, batching, acknowledgement, power loss,
# the byte budget.
import gc
import os

import micropython
from backlog import BacklogLog


def body(i):
    return b'{"seq": %d, "temp_c": 21.5}' % i


def records(log, size):
    # Copies of the bodies of the records a read put in the log's read area
    # (framed as on flash), which the next read overwrites.
    area = log.area
    bodies = []
    p = 0
    while p < size:
        n = area[p] | area[p + 1] << 8
        bodies.append(bytes(area[p + 6 : p + 6 + n]))
        p += 6 + n
    assert p == size
    return bodies


def read(log, max_bytes, start=None):
    count, size, position = log.read_batch(max_bytes, start)
    bodies = records(log, size)
    assert len(bodies) == count
    return bodies, position


def take(log, max_bytes, start=None):
    count, size, token = log.next_batch(max_bytes, start)
    bodies = records(log, size)
    assert len(bodies) == count
    return bodies, token


def newest_segment():
    return "log/" + sorted(n for n in os.listdir("log") if n.endswith(".seg"))[-1]


def forward_all(log, max_bytes=512):
    got = []
    while True:
        log.flush()
        bodies, position = read(log, max_bytes)
        if not bodies:
            return got
        got.extend(bodies)
        log.commit(position)


def test_records_come_back_in_order_exactly_once():
    log = BacklogLog(flush_records=4)
    for i in range(100):
        log.append(body(i))
    assert forward_all(log) == [body(i) for i in range(100)]
    assert forward_all(log) == []


def test_an_empty_log_reads_nothing_and_stays_where_it_is():
    log = BacklogLog()
    bodies, position = read(log, 512)
    assert bodies == [] and position == (log.seg, log.off)
    log.commit(position)


def test_records_are_written_in_batches_not_one_by_one():
    log = BacklogLog(flush_records=8, flush_ms=60000)
    for i in range(7):
        log.append(body(i))
    assert log.records_flushed == 0 and not log.flush_due()
    log.append(body(7))
    assert log.records_flushed == 8


def test_a_batch_not_acknowledged_is_read_again():
    log = BacklogLog(flush_records=1)
    for i in range(10):
        log.append(body(i))
    first = read(log, 100)[0]
    again = read(log, 100)[0]
    assert first == again and first[0] == body(0)


def test_reboot_resumes_after_the_last_acknowledged_record():
    log = BacklogLog(flush_records=1)
    for i in range(20):
        log.append(body(i))
    bodies, position = read(log, 200)
    log.commit(position)
    rebooted = BacklogLog(flush_records=1)
    rebooted.append(body(20))
    assert forward_all(rebooted) == [body(i) for i in range(len(bodies), 21)]


def test_unflushed_records_are_the_only_loss_at_power_cut():
    log = BacklogLog(flush_records=5)
    for i in range(13):
        log.append(body(i))
    # power cut: the 3 records still in RAM are gone, the flushed 10 are not
    assert forward_all(BacklogLog()) == [body(i) for i in range(10)]


def test_torn_record_is_detected_and_never_forwarded():
    log = BacklogLog(flush_records=1)
    for i in range(5):
        log.append(body(i))
    name = newest_segment()
    with open(name, "ab") as f:
        f.write(b"\x20\x00\x01\x02\x03\x04{\"seq\": 5, \"te")  # cut mid-write
    rebooted = BacklogLog(flush_records=1)
    rebooted.append(body(6))
    assert forward_all(rebooted) == [body(i) for i in range(5)] + [body(6)]


def test_corrupted_record_fails_its_crc_and_is_skipped():
    log = BacklogLog(flush_records=1)
    for i in range(3):
        log.append(body(i))
    name = newest_segment()
    with open(name, "rb") as f:
        data = bytearray(f.read())
    data[-3] ^= 0xFF  # flip bits in the last record's body
    with open(name, "wb") as f:
        f.write(data)
    rebooted = BacklogLog(flush_records=1)
    rebooted.append(body(9))
    assert forward_all(rebooted) == [body(0), body(1), body(9)]
    assert rebooted.corrupt >= 1


def test_full_budget_drops_the_oldest_records_and_counts_them():
    log = BacklogLog(budget=4096, segment_size=1024, flush_records=4)
    for i in range(1000):
        log.append(body(i))
    log.flush()
    assert log.stored_bytes() <= 4096
    got = forward_all(log)
    assert log.dropped + len(got) == 1000, (log.dropped, len(got))
    assert got[-1] == body(999)
    assert got == [body(i) for i in range(1000 - len(got), 1000)]  # the newest survive, in order
    assert BacklogLog().dropped == log.dropped  # the count survives a reboot


def test_acknowledged_segments_are_deleted():
    log = BacklogLog(segment_size=256, flush_records=2)
    for i in range(100):
        log.append(body(i))
    forward_all(log)
    assert len([n for n in os.listdir("log") if n.endswith(".seg")]) == 1


def test_flash_bytes_per_record_stay_close_to_the_record_size():
    log = BacklogLog(flush_records=16)
    for i in range(320):
        log.append(body(i))
    while True:
        log.flush()
        bodies, position = read(log, 1024)
        if not bodies:
            break
        log.commit(position)
    per_record = log.flash_bytes / 320
    assert per_record < len(body(100)) + 6 + 8, per_record


def drain(log, max_bytes=512):
    # Forwarding as the device does it: flushed records first, then RAM.
    got = []
    while True:
        bodies, token = take(log, max_bytes)
        if not bodies:
            return got
        got.extend(bodies)
        log.ack(token)


def test_readings_acknowledged_from_ram_never_reach_flash():
    log = BacklogLog(flush_records=16, flush_ms=60000)
    for i in range(10):
        log.append(body(i))
        assert drain(log) == [body(i)]
    assert log.flash_bytes == 0 and log.backlog() == 0


def test_flushed_records_go_before_the_ones_still_in_ram():
    log = BacklogLog(flush_records=4, flush_ms=60000)
    for i in range(10):  # 8 flushed, 2 in RAM
        log.append(body(i))
    assert log.backlog() == 10
    first, token = take(log, 10)
    assert first == [body(0)]
    log.ack(token)
    assert drain(log) == [body(i) for i in range(1, 10)]
    assert log.backlog() == 0
    log.append(body(10))
    log.flush()
    assert drain(BacklogLog()) == [body(10)]  # nothing acknowledged comes back


def test_a_ram_batch_not_acknowledged_is_offered_again_and_survives_a_flush():
    log = BacklogLog(flush_records=16, flush_ms=60000)
    for i in range(3):
        log.append(body(i))
    offered = take(log, 512)[0]
    log.flush()  # the link went down: the flush policy writes them out
    assert drain(log) == offered == [body(0), body(1), body(2)]


def test_backlog_count_is_rebuilt_at_boot():
    log = BacklogLog(flush_records=1)
    for i in range(7):
        log.append(body(i))
    bodies, token = take(log, 60)
    log.ack(token)
    assert BacklogLog().backlog() == 7 - len(bodies)


def test_a_corrupt_record_is_counted_once_however_often_it_is_read():
    log = BacklogLog(flush_records=1)
    for i in range(3):
        log.append(body(i))
    name = newest_segment()
    with open(name, "rb") as f:
        data = bytearray(f.read())
    data[-3] ^= 0xFF
    with open(name, "wb") as f:
        f.write(data)
    rebooted = BacklogLog(flush_records=1)
    for _ in range(3):
        read(rebooted, 512)
    assert drain(rebooted) == [body(0), body(1)]
    assert rebooted.corrupt == 1


def test_a_failing_write_drops_the_oldest_and_recording_goes_on():
    log = BacklogLog(budget=1 << 20, segment_size=300, flush_records=4)
    for i in range(40):
        log.append(body(i))
    # The next segment cannot be written (as when the filesystem is full).
    blocked = "log/%08d.seg" % (log.active + 1)
    os.mkdir(blocked)
    for i in range(40, 80):
        log.append(body(i))
    os.rmdir(blocked)
    got = drain(log)
    assert log.dropped > 0
    assert len(got) + log.dropped == 80, (len(got), log.dropped)
    assert got[-1] == body(79) and got == sorted(got, key=lambda b: int(b[8:b.index(b",")]))


def test_batches_in_flight_follow_each_other_and_one_ack_covers_them():
    # The forwarder keeps several batches in flight: each starts where the
    # one before ended, segments included, and records still in RAM never
    # join a batch sent behind others.
    log = BacklogLog(segment_size=200, flush_records=8, flush_ms=60000)
    for i in range(30):  # 24 flushed over several segments, 6 in RAM
        log.append(body(i))
    sent = []
    tokens = []
    start = None
    while True:
        bodies, token = take(log, 100, start)
        if not bodies:
            break
        sent.extend(bodies)
        tokens.append(token)
        start = token[0]
    assert sent == [body(i) for i in range(24)] and token is None
    assert len(tokens) > 4
    # The gateway acks the first three at once: one cursor write for them.
    covered = sum(t[1] for t in tokens[:3])
    log.ack((tokens[2][0], covered, 0, 0))
    assert log.backlog() == 30 - covered
    assert drain(log) == [body(i) for i in range(covered, 30)]


def test_recording_into_ram_asks_the_heap_for_nothing():
    # The RAM buffer is allocated once: a reading is kept even when the heap
    # cannot give a single block (a heap fragmented by a busy forwarder).
    log = BacklogLog(flush_records=16, flush_ms=60000)
    bodies = [body(i) for i in range(10)]
    micropython.heap_lock()
    try:
        for b in bodies:
            log.append(b)
    finally:
        micropython.heap_unlock()
    assert log.backlog() == 10
    assert drain(log) == bodies


def test_a_full_ram_buffer_goes_to_flash_before_the_count_is_reached():
    log = BacklogLog(flush_records=256, flush_ms=60000, pending_bytes=1030)
    for i in range(40):  # 33 bytes each with their header: the buffer holds 31
        log.append(body(i))
    assert log.records_flushed == 31 and log.backlog() == 40
    assert drain(log) == [body(i) for i in range(40)]


def allocating(fn, *args):
    # fn(*args), and the heap it allocated (no collection in between).
    gc.collect()
    gc.disable()
    try:
        before = gc.mem_alloc()
        result = fn(*args)
        return result, gc.mem_alloc() - before
    finally:
        gc.enable()


def test_a_batch_read_from_flash_or_ram_is_not_copied():
    # Forwarding a backlog, a batch is read into the read area, one flash
    # read per batch, and left there, framed as on flash, for the device
    # to send from where it lies: no copy, only a small view per record
    # for its CRC. Copies cost the heap a batch's size for every batch,
    # and a board forwarding a backlog on a small heap its time in garbage
    # collection and its large free blocks.
    log = BacklogLog(flush_records=16, flush_ms=60000, pending_bytes=3072)  # room for 16
    for i in range(200):
        log.append(b'{"seq": %d, "note": "%s"}' % (i, "x" * 120))
    (count, size, _), allocated = allocating(log.read_batch, 4096)
    assert count > 20 and size > 4096 and allocated < 64 * count + 512, (count, size, allocated)
    # The same from RAM: the last 8 records were never flushed.
    while True:
        count, size, token = log.next_batch(4096)
        if token[0] is None:
            break
        log.ack(token)
    assert count == 8
    log.ack(token)
    log.append(body(1))
    (count, size, _), allocated = allocating(log.next_batch, 4096)
    assert count == 1 and allocated < 1024, allocated  # flash is looked at first: a file opened


def test_a_given_read_area_is_where_batches_are_read():
    # The device lends the log part of its packet buffer.
    lent = bytearray(2000)
    log = BacklogLog(flush_records=1, read_area=memoryview(lent)[100:1200])
    for i in range(3):
        log.append(body(i))
    count, size, _ = log.read_batch(4096)
    assert count == 3 and records(log, size) == [body(i) for i in range(3)]
    assert bytes(lent[106:106 + len(body(0))]) == body(0) and lent[:100] == bytearray(100)
    try:
        BacklogLog(read_area=bytearray(1000))
        assert False, "a read area too small for one record was accepted"
    except ValueError:
        pass


def test_a_reading_whose_flush_finds_no_heap_is_kept_and_written_later():
    log = BacklogLog(flush_records=4, flush_ms=60000)
    for i in range(3):
        log.append(body(i))
    fourth = body(3)
    micropython.heap_lock()
    try:
        log.append(fourth)  # due to flush, which cannot get heap
    finally:
        micropython.heap_unlock()
    assert log.backlog() == 4 and log.records_flushed == 0
    log.flush()
    assert log.records_flushed == 4
    assert drain(log) == [body(i) for i in range(4)]


class _RefusedOnce(BacklogLog):
    # A heap that cannot give the read buffer when the log is made (a soft
    # reboot before the last boot's objects are collected), and can later.
    refused = False

    def _area_for(self):
        if not self.refused:
            self.refused = True
            raise MemoryError("memory allocation failed")
        return BacklogLog._area_for(self)


def test_a_log_refused_its_read_buffer_at_boot_boots_and_reads_all_the_same():
    log = BacklogLog(flush_records=1)
    for i in range(5):
        log.append(body(i))
    rebooted = _RefusedOnce(flush_records=1)
    assert rebooted.backlog() == 5
    assert drain(rebooted) == [body(i) for i in range(5)]
