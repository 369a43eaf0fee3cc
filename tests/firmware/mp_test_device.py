# Pieces of the device that need no broker: the bounded inbox, the device
# id, the backoff schedule.
import json
import os

from device import Inbox, device_id_from
from link import backoff_ms


def test_inbox_keeps_order_and_counts_what_it_drops():
    inbox = Inbox(3)
    for i in range(5):
        inbox.put(i)
    assert inbox.dropped == 2 and inbox.count == 3
    assert [inbox.get() for _ in range(3)] == [0, 1, 2]
    inbox.put(9)
    assert inbox.get() == 9


def test_device_id_comes_from_settings_when_given():
    assert device_id_from({"device_id": "kitchen-1"}) == "kitchen-1"


def test_device_id_is_derived_from_the_unique_id_otherwise():
    os.putenv("FLEET_SIM_UNIQUE_ID", "e66141040396a32c")
    assert device_id_from({"device_id": None}) == "sim-e66141040396a32c"


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    for attempt in range(20):
        ceiling = min(100 << attempt, 5000)
        samples = [backoff_ms(attempt, 100, 5000) for _ in range(50)]
        assert all(100 <= d <= ceiling for d in samples), (attempt, samples)
    assert len(set(backoff_ms(6, 100, 5000) for _ in range(50))) > 10  # jittered
    assert max(backoff_ms(30, 100, 5000) for _ in range(200)) > 2500  # reaches the cap's range


def test_an_older_micropython_is_named_and_a_newer_one_is_not():
    from settings import too_old

    assert too_old("1.21", (1, 20, 0)) == "1.20.0"
    assert too_old("1.21", (1, 21, 0)) is None
    assert too_old("1.21", (1, 28, 0, "")) is None
    assert too_old("1.21", (2, 0, 0)) is None


def _device():
    import settings
    from device import Device

    protocol = settings.load_protocol()
    chosen = settings.validate({"wifi_ssid": "lab", "mqtt_host": "127.0.0.1", "device_id": "heap-1"}, protocol["settings"])
    return Device(chosen, protocol)


def test_a_reading_refused_for_want_of_heap_is_counted_and_the_next_one_goes_in():
    import micropython

    device = _device()
    assert device.record({"temp_c": 20})
    reading = {"temp_c": 21}
    micropython.heap_lock()
    try:
        accepted = device.record(reading)
    finally:
        micropython.heap_unlock()
    assert accepted is False and device.rejected == 1
    assert device.record({"temp_c": 22})
    device.backlog.flush()
    count, size, _ = device.backlog.next_batch(4096)
    start, end, last = device.forwarder.lay_out(size, -1, 0)
    records = json.loads(device.packet[start:end])["records"]
    assert [r["temp_c"] for r in records] == [20, 22], records  # nothing torn in between


def test_a_batch_is_laid_out_where_the_log_read_it_one_record_per_line():
    device = _device()
    for i in range(3):
        device.record({"n": i})
    device.backlog.flush()
    count, size, token = device.backlog.next_batch(4096)
    at = device.forwarder.payload_at
    first = bytes(device.packet[at + 6 : at + 16])  # the first record's body, where the log read it
    start, end, last = device.forwarder.lay_out(size, 7, 2)
    assert count == 3 and last == 2 and end == at + size + 3
    payload = bytes(device.packet[start:end])
    lines = payload.split(b"\n")
    assert lines[0] == b'{"prev": 7, "dropped": 0, "backlog": 2, "records": [', lines
    assert lines[1].startswith(b"    " + first) and lines[1].endswith(b",") and lines[4] == b"]}", lines
    assert [r["n"] for r in json.loads(payload)["records"]] == [0, 1, 2]
    assert json.loads(payload)["records"][0]["seq"] == 0


def test_a_record_s_seq_is_read_where_it_lies():
    from forwarder import seq_of

    packet = bytearray(b'xx{"seq": 4071, "ts": 1}{"seq": 9}')
    assert seq_of(packet, 2, 24) == 4071 and seq_of(packet, 24, len(packet)) == 9


class _SentBatches:
    # A link that is up and keeps every batch sent, as bytes; the broker
    # acknowledges nothing.
    connected = True
    connects = 1
    pubacked = 0

    def __init__(self):
        self.batches = []

    def send(self, topic, packet, start, end):
        self.batches.append(json.loads(packet[start:end]))
        return len(self.batches)

    def keepalive(self):
        pass


def test_each_batch_says_exactly_how_many_readings_wait_behind_it():
    import asyncio
    from time import ticks_ms

    device = _device()
    device.settings["forward_window"] = 4
    device.settings["ack_timeout_ms"] = 100
    for i in range(40):  # readings of different sizes, so batches differ in count
        device.record({"note": "x" * (i % 7 * 9)})
    device.backlog.flush()
    link = device.link = device.forwarder.link = _SentBatches()
    # No gateway acks: one window goes out, then the pass ends on the
    # timeout, which the device's clock (tick) makes it notice.
    async def one_pass():
        asyncio.create_task(device.tick())
        await device.forwarder.send_pass(300, ticks_ms(), 0)

    asyncio.run(one_pass())
    assert len(link.batches) == 4, link.batches
    counts = [len(b["records"]) for b in link.batches]
    assert len(set(counts)) > 1, counts
    sent = 0
    for batch, count in zip(link.batches, counts):
        sent += count
        assert batch["backlog"] == 40 - sent, (batch["backlog"], 40 - sent, counts)


def test_a_task_that_dies_is_started_again_and_counted():
    import asyncio

    device = _device()
    runs = []
    done = asyncio.Event()

    async def flaky():
        runs.append(1)
        if len(runs) < 3:
            raise MemoryError("fragmented")
        done.set()
        await asyncio.sleep_ms(60000)

    async def main():
        task = asyncio.create_task(device.keep_running("flaky", flaky, 10))
        await asyncio.wait_for_ms(done.wait(), 5000)
        task.cancel()

    asyncio.run(main())
    assert len(runs) == 3 and device.errors == 2


class _StopsSoon:
    # Stands in for a device's stop event: the boot runs for 100 ms, with
    # every task started (link retrying, telemetry recording), then stops.
    async def wait(self):
        import asyncio

        await asyncio.sleep_ms(100)

    def set(self):
        pass


def _run_once_and_return():
    # Everything a boot loads lazily gets loaded here, in a frame that is
    # gone once this returns.
    import asyncio

    device = _device()
    device.stopped = _StopsSoon()
    asyncio.run(device.run())
    asyncio.new_event_loop()


def test_after_a_soft_reboot_the_next_boot_finds_the_heap_the_first_one_had():
    # main() builds the next Device in the same heap. MicroPython's GC is
    # conservative: anything of the stopped device left in a frame still
    # running keeps its link, log and tasks alive, and the next boot failed
    # for want of them (17 KB at 128k).
    import gc

    import coldcode
    import startup

    _run_once_and_return()
    free = []

    def next_device():
        gc.collect()
        free.append(gc.mem_free())
        if len(free) == 2:
            raise KeyboardInterrupt  # the one exception main() lets out
        booted = _device()
        coldcode.let_go()  # as _new_device does
        booted.stopped = _StopsSoon()
        booted.reboot_requested = True
        return booted

    startup._new_device = next_device
    try:
        startup.main()
    except KeyboardInterrupt:
        pass
    assert len(free) == 2 and free[1] >= free[0] - 1024, free


def test_the_device_is_built_once_protocol_json_is_gone():
    # protocol.json takes about 11 KB of heap as objects on the unix port,
    # of which the Device keeps under 1 KB. Built while the whole of it was
    # still alive, the two did not fit in a 64 KB heap: the board could not
    # boot. What is alive when the Device starts: the settings and the
    # little it takes of the protocol.
    import gc

    import device as firmware
    import startup

    with open("settings.json", "w") as f:
        f.write('{"wifi_ssid": "lab", "mqtt_host": "127.0.0.1", "device_id": "heap-1"}')
    startup._device_settings()  # what it loads once, loaded
    gc.collect()
    before = gc.mem_alloc()
    alive = []
    build = firmware.Device.__init__

    def measured(self, settings, protocol):
        gc.collect()
        alive.append(gc.mem_alloc() - before)
        build(self, settings, protocol)

    firmware.Device.__init__ = measured
    try:
        startup._new_device()
    finally:
        firmware.Device.__init__ = build
    assert alive[0] < 5000, alive
    import sys

    assert "settings" not in sys.modules  # the boot's code, let go of from source and .mpy alike


def test_code_for_commands_configuration_and_queries_is_let_go_of_after_each_message():
    # Compiled (a ROM image, .mpy files): imported for the message, then
    # back to the heap. Kept, it cost about 7 KB for good from the image,
    # 14 KB from .mpy files (unix port, measured).
    import asyncio
    import gc
    import sys

    import coldcode

    coldcode.FROM_SOURCE = False  # as compiled, on every board (these tests run it from source)
    device = _device()
    sent = []
    device.link.publish = lambda topic, payload, retain=False, qos=0: sent.append((topic, json.loads(payload)))

    def messages(version):
        for topic, message in (
            (device.topics["cmd"], {"id": "c%d" % version, "name": "ping"}),
            (device.topics["config"], {"version": version, "config": {"led": True}}),
            (device.fleet_topics["query"], {"q": "q1", "where": [">", "temp_c", -100], "fields": ["id"]}),
        ):
            device.inbox.put((topic, json.dumps(message).encode(), 0))
        device.inbox.put((device.topics["display"], b"hello %d" % version, 0))
        _dispatch_all(device)

    coldcode.let_go()  # as _new_device does
    messages(1)  # the first time, from source, interns names for good
    gc.collect()
    before = gc.mem_alloc()
    sent.clear()
    messages(2)
    assert [body["status"] for topic, body in sent if topic == device.topics["cmd/result"]] == ["delivered", "succeeded"]
    assert device.config_version == 2 and device.led_on and device.info()["config"] == 2
    assert [body["match"] for topic, body in sent if topic == device.topics["answer"]] == [True]
    assert device.display_text == "hello 2"
    assert not [name for name in coldcode.COLD if name in sys.modules]
    sent.clear()
    gc.collect()
    assert gc.mem_alloc() - before < 512, gc.mem_alloc() - before


def test_from_source_the_code_for_commands_and_the_rest_is_imported_once_and_kept():
    # An import from source compiles the module, which needs far more heap
    # than the module itself: doing it for every message would not fit.
    import sys

    import coldcode

    assert coldcode.FROM_SOURCE
    assert all(name in sys.modules for name in coldcode.COLD)
    coldcode.let_go()
    assert all(name in sys.modules for name in coldcode.COLD)


def _dispatch_all(device, until=None):
    # Runs the device's dispatch until its inbox is empty and `until()`
    # holds (a message may wait for heap: see Device._import_code).
    import asyncio

    async def run():
        task = asyncio.create_task(device.dispatch())
        for _ in range(300):  # at most 3 s
            await asyncio.sleep_ms(10)
            if not device.inbox.count and (until is None or until()):
                break
        await asyncio.sleep_ms(10)  # the last one handled
        task.cancel()

    asyncio.run(run())


def _device_with_code(module, source):
    # A device whose messages are all handled by `module`, written from
    # `source` (see Device._code_for), and what it publishes.
    import sys

    sys.path.append("code")
    os.mkdir("code")
    with open("code/%s.py" % module, "w") as f:
        f.write(source)
    device = _device()
    sent = []
    device.link.publish = lambda topic, payload, retain=False, qos=0: sent.append((topic, json.loads(payload)))
    device._code_for = lambda topic: module
    return device, sent


def test_a_message_whose_code_finds_no_heap_waits_and_tries_again():
    # Its import fails twice, as into a fragmented heap, then fits.
    source = "with open('tries', 'a') as f:\n    f.write('x')\nif len(open('tries').read()) < 3:\n    raise MemoryError\n"
    device, sent = _device_with_code("no_heap_twice", source)
    device.inbox.put((device.topics["cmd"], b'{"id": "c8", "name": "ping"}', 0))
    _dispatch_all(device, lambda: len(sent) == 2)
    assert open("tries").read() == "xxx"
    assert [body["status"] for topic, body in sent] == ["delivered", "succeeded"], sent


def test_a_command_whose_code_never_finds_heap_is_answered_failed_not_left_unanswered():
    device, sent = _device_with_code("no_heap", "raise MemoryError\n")
    device.inbox.put((device.topics["cmd"], b'{"id": "c9", "name": "ping"}', 0))
    device.inbox.put((device.topics["cmd"], b'{"id": 9', 0))  # and one it cannot even read
    device.inbox.put((device.topics["config"], b'{"version": 2, "config": {}}', 0))  # dropped, said so
    _dispatch_all(device, lambda: len(sent) == 2)
    assert sent == [
        (device.topics["cmd/result"], {"id": "c9", "status": "failed", "error": "out of memory on the board"}),
        (device.topics["cmd/result"], {"id": None, "status": "failed", "error": "out of memory on the board"}),
    ], sent
    assert device.config_version == 0


def test_batches_take_at_most_a_32nd_of_the_heap():
    import gc

    from forwarder import batch_bytes_for

    assert batch_bytes_for(4096, 64 * 1024) == 2048  # the unix port at -X heapsize=64k
    assert batch_bytes_for(4096, 128 * 1024) == 4096
    assert batch_bytes_for(8192, 160 * 1024) == 5120  # a Pico W's heap
    assert batch_bytes_for(4096, 16 * 1024) == 1024  # never less
    assert batch_bytes_for(512, 64 * 1024) == 512  # a smaller setting stands
    device = _device()
    heap = gc.mem_alloc() + gc.mem_free()
    assert device.batch_bytes == batch_bytes_for(4096, heap)


def test_every_count_the_firmware_keeps_is_reported_in_info():
    device = _device()
    for _ in range(9):  # one more than the inbox holds
        device.inbox.put((b"fleet/heap-1/display", b"x", 0))
    device.rejected = 2
    device.errors = 3
    device.state.save_error = "state.json not saved (ENOSPC)"
    expected = {"inbox_dropped": 1, "rejected": 2, "errors": 3, "forwarded": 0, "corrupt": 0, "connects": 0,
                "save_error": "state.json not saved (ENOSPC)"}
    assert device.info()["counters"] == expected, device.info()["counters"]
