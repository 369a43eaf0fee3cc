# A board running the fleet firmware: everything it is made of is created
# here, at boot, and held by one Device object (no module-level state), so a
# single VM can host several simulated boards.
import asyncio
import gc
import json
import sys
from time import sleep_ms, ticks_add, ticks_diff, ticks_ms

from micropython import const

import board as profile
from backlog import BacklogLog, area_size
from display import render, to_text
from link import HEADER_ROOM, Link
from state import DeviceState
from telemetry import Telemetry

# Room for a batch's JSON envelope, in front of its records (_lay_out).
_ENVELOPE_ROOM = const(128)
_TICK_MS = const(250)  # see tick()
# A batch takes at most this part of the heap: its packet buffer is the
# board's largest block, held for good. The default 4 KB batches need a
# 128 KB heap (a Pico W has 150-190 KB); on a 64 KB heap they are 2 KB.
_HEAP_PER_BATCH = const(32)
_CODE_TRIES = const(5)  # see _import_code
_CODE_RETRY_MS = const(200)


# Code a board runs only now and then: a command, a configuration, a
# query, the settings at boot. Run in place from a ROM image, it is
# imported where it is used and let go of once that message, or the boot,
# is done (_let_go): its function objects and classes, about 6 KB of heap
# on the unix port (measured), go back to the heap instead of staying for
# good, and importing it again costs 20-100 us there (its names stay
# interned; its code never leaves the image). A message imports its code
# before anything else (_import_code). From .mpy files an import copies
# the module's code into the heap, so it is imported once, here, before
# the Device asks for its buffers, and kept.
_COLD = ("commands", "config", "query", "settings")
_IN_PLACE = __file__.startswith("/rom/")
if not _IN_PLACE:
    for _name in _COLD:
        __import__(_name)


def _let_go():
    if _IN_PLACE:
        for name in _COLD:
            sys.modules.pop(name, None)


def log(line):
    print(line)


def device_id_from(settings):
    if settings["device_id"]:
        return settings["device_id"]
    uid = profile.unique_id()
    return "%s-%s" % (profile.NAME.replace("_", ""), "".join("%02x" % b for b in uid))[:32]


class Inbox:
    # Bounded queue of incoming (topic, payload) pairs; counts what it drops
    # rather than letting a flood exhaust the heap.
    def __init__(self, size):
        self.items = [None] * size
        self.head = 0
        self.count = 0
        self.dropped = 0
        self.ready = asyncio.Event()

    def put(self, item):
        size = len(self.items)
        if self.count == size:
            self.dropped += 1
            return
        self.items[(self.head + self.count) % size] = item
        self.count += 1
        self.ready.set()

    def get(self):
        item = self.items[self.head]
        self.items[self.head] = None
        self.head = (self.head + 1) % len(self.items)
        self.count -= 1
        return item


def batch_bytes_for(wanted, heap):
    # The batch_bytes setting, or less on a heap too small for it (but
    # never under 1 KB): see _HEAP_PER_BATCH.
    return min(wanted, max(1024, heap // _HEAP_PER_BATCH))


def _seq_of(packet, start, end):
    # The "seq" of the record in packet[start:end] as record() wrote it,
    # without parsing it all (or copying it).
    at = packet.find(b'"seq": ', start, end) + 7
    seq = 0
    while 48 <= packet[at] <= 57:
        seq = seq * 10 + packet[at] - 48
        at += 1
    return seq


class Device:
    def __init__(self, settings, protocol):
        self.settings = settings
        self.id = device_id_from(settings)
        self.started = ticks_ms()
        self.board = profile.Board(self.id)
        self.state = DeviceState()
        self.state.boot()
        if self.state.warning:
            log("state: " + self.state.warning)
        self.firmware = protocol["firmware"]
        root = "%s/%s/" % (protocol["topic_root"], self.id)
        self.topics = {name: (root + name).encode() for name in protocol["topics"]}
        fleet_root = protocol["topic_root"] + "/"
        self.fleet_topics = {name: (fleet_root + name).encode() for name in protocol["fleet_topics"]}
        self.inbox = Inbox(8)
        # The packet buffer: every packet the link sends is gathered here,
        # and a batch of readings is read into it by the log, in the area
        # after room for the packet's header and the batch's envelope, and
        # sent from where it lies (_lay_out). One buffer, allocated once:
        # a batch costs no copy and no heap of its own.
        self._payload_at = HEADER_ROOM + len(self.topics["batch"]) + _ENVELOPE_ROOM
        heap = gc.mem_alloc() + gc.mem_free()
        self.batch_bytes = batch_bytes_for(settings["batch_bytes"], heap)
        if self.batch_bytes < settings["batch_bytes"]:
            log("forward: batches of %d bytes, not %d, on a heap of %d KB" % (self.batch_bytes, settings["batch_bytes"], heap // 1024))
        area = area_size(self.batch_bytes)
        self.packet = bytearray(self._payload_at + area + 3)  # 3: the batch's closing "\n]}"
        self.link = Link(self.id, settings, self.board, profile.TCP_NODELAY, self.topics["status"], self._on_message, log,
                         self.packet)
        self.link.will = self._presence(False)
        self.link.birth = self._birth  # built at each connect: it carries the backlog
        self.link.subscribe(self.topics["ping"], 0)
        self.link.subscribe(self.topics["ack"], 0)
        # QoS 0 on purpose: the broker then queues nothing for the offline
        # session, and the retained message, sent on every (re)subscribe,
        # brings just the latest configuration. QoS 1 would replay every
        # change made while the board was away.
        self.link.subscribe(self.topics["config"], 0)
        # QoS 1: the broker queues commands for the offline session.
        self.link.subscribe(self.topics["cmd"], 1)
        # QoS 0: a live query, and pushed text, are for the boards online now.
        self.link.subscribe(self.fleet_topics["query"], 0)
        self.link.subscribe(self.fleet_topics["display"], 0)
        self.link.subscribe(self.topics["display"], 0)
        self.telemetry = Telemetry(self, settings["telemetry_interval_ms"])
        self.backlog = BacklogLog(
            "log", settings["backlog_budget"], max(1024, settings["backlog_budget"] // 16),
            settings["flush_records"], settings["flush_ms"],
            read_area=memoryview(self.packet)[self._payload_at:self._payload_at + area],
        )
        self.recorded = asyncio.Event()
        self.link.on_up = self.recorded.set  # forward the backlog as soon as the link is up
        self.stored = asyncio.Event()  # the gateway acknowledged a batch
        self.stored_seq = -1  # the last sequence the gateway says is stored
        self.forwarded = 0
        self.rejected = 0  # readings refused by record() (too large, or no heap)
        self.errors = 0
        self.log_level = "info"
        self.display_text = ""
        try:
            self.screen = self.board.display()  # None: no display attached
        except Exception as e:
            log("display: unavailable (%r)" % (e,))
            self.screen = None
        self.config_schema = protocol["config"]
        self.config_version = 0  # 0: nothing pushed yet, defaults in force
        config = self._config()
        config.load()  # before any connection: what was last applied
        self.config_version = config.version
        self.reboot_requested = False
        self.stopped = asyncio.Event()
        import commands

        commands.remove_earlier_file()

    def _config(self):
        # A Config for one message, at the version in force (cold code).
        import config

        return config.Config(self.config_schema, self._apply_config, self._report_config, log,
                             version=self.config_version)

    def _commands(self):
        # Commands for one message (cold code): what they keep is on flash.
        import commands

        return commands.Commands(self, self._report_command, log)

    def _apply_config(self, values):
        # Everything the configuration controls, live, without a reboot.
        settings = self.settings
        self.telemetry.interval_ms = values.get("telemetry_interval_ms", settings["telemetry_interval_ms"])
        self.backlog.flush_records = values.get("flush_records", settings["flush_records"])
        self.backlog.flush_ms = values.get("flush_ms", settings["flush_ms"])
        self.log_level = values.get("log_level", "info")
        self.led_on = values.get("led", False)
        self.board.led(self.led_on)
        text = values.get("display", "")
        if text != self.display_text:
            self.show(text)

    def _report_config(self, payload):
        self.link.publish(self.topics["config/reported"], payload, True, 1)

    def _report_command(self, payload):
        self.link.publish(self.topics["cmd/result"], payload, False, 1)

    def info(self):
        # What `info` returns and what live queries filter on.
        gc.collect()
        return {
            "id": self.id,
            "board": profile.NAME,
            "firmware": self.firmware,
            "groups": self.settings["groups"],
            "boots": self.state.boots,
            "uptime_s": ticks_diff(ticks_ms(), self.started) // 1000,
            "heap_free": gc.mem_free(),
            "temp_c": self.board.temperature_c(),
            "rssi": self.board.rssi(),
            "config": self.config_version,
            "backlog": self.backlog.backlog(),
            "dropped": self.backlog.dropped,
            "display": self.display_text,
            "online": self.link.connected,
            "counters": self.counters(),
        }

    def counters(self):
        # Every count the firmware keeps, reported by `info` (on demand: in
        # the birth it cost the next soft reboot its packet buffer).
        return {
            "inbox_dropped": self.inbox.dropped,  # messages lost to a full inbox
            "rejected": self.rejected,  # readings record() refused
            "errors": self.errors,  # failures the tasks survived
            "forwarded": self.forwarded,  # readings acknowledged by the broker this boot
            "corrupt": self.backlog.corrupt,  # log records skipped at boot
            "connects": self.link.connects,
            "save_error": self.state.save_error,
        }

    def answer(self, payload):
        # A live query: evaluate the filter here, answer matching or not.
        import query

        try:
            asked = json.loads(payload)
            query_id = asked["q"]
            where = asked.get("where")
            fields = asked.get("fields")
            if not isinstance(query_id, str) or (fields is not None and not isinstance(fields, list)):
                raise ValueError("q must be a string and fields a list")
        except Exception as e:
            log("query: malformed message ignored: %r" % (e,))
            return
        reply = {"q": query_id, "id": self.id}
        try:
            info = self.info()
            reply["match"] = True if where is None else bool(query.evaluate(where, info))
            if reply["match"]:
                reply["fields"] = info if fields is None else {f: info.get(f) for f in fields if isinstance(f, str)}
        except (query.BadFilter, RuntimeError) as e:  # RuntimeError: recursion on a hostile filter
            reply["error"] = str(e)
        self.link.publish(self.topics["answer"], json.dumps(reply).encode(), False, 0)

    def show(self, text):
        # On the display when the board has one; without, the LED blinks
        # twice to say there is news. The console always shows it.
        self.display_text = text
        log("display: " + text)
        if self.screen is not None:
            try:
                render(self.screen, text)
            except Exception as e:  # a display that fails must not take the board with it
                log("display: %r" % (e,))
        else:
            self.blink(2)

    def blink(self, times):
        asyncio.create_task(self._blink(times))

    async def _blink(self, times):
        for _ in range(times):
            self.board.led(True)
            await asyncio.sleep_ms(150)
            self.board.led(False)
            await asyncio.sleep_ms(150)
        self.board.led(self.led_on)  # back to what the configuration says

    def _presence(self, online):
        status = {
            "online": online,
            "id": self.id,
            "board": profile.NAME,
            "firmware": self.firmware,
            "boots": self.state.boots,
            "reset": profile.reset_cause(),
        }
        if online:
            status["backlog"] = self.backlog.backlog()
            status["dropped"] = self.backlog.dropped
            status["groups"] = self.settings["groups"]
            status["config"] = self.config_version
        return json.dumps(status).encode()

    def _birth(self):
        return self._presence(True)

    # -- telemetry ---------------------------------------------------------------
    def record(self, reading):
        # The one door for readings: into the flash log first, online or
        # not; the forwarder takes them from there. Never raises: a reading
        # that cannot be kept is counted in `rejected` (its seq stays unused).
        try:
            reading["seq"] = self.state.next_seq()
            reading["ts"] = self.board.time_s()
            reading["boot"] = self.state.boots
            self.backlog.append(json.dumps(reading).encode())
        except ValueError as e:  # too big for one record: say so, keep running
            self.rejected += 1
            log("reading %d rejected: %s" % (reading["seq"], e))
            return False
        except MemoryError:  # no heap for it now; this message allocates nothing
            self.rejected += 1
            log("reading rejected: out of memory")
            return False
        if self.log_level == "debug":
            log("reading %d recorded" % reading["seq"])
        self.recorded.set()
        return True

    async def forward(self):
        # Oldest first, several readings per QoS 1 message, up to
        # forward_window batches in flight. The log moves on only when the
        # gateway says the readings are in the telemetry stream (topic ack):
        # nats-server acknowledges an MQTT publish before a stream has
        # stored it, so a PUBACK alone can lose readings when the broker
        # stops. No ack in ack_timeout_ms: everything in flight goes again
        # from the log's cursor after a growing pause (no gateway running).
        log_ = self.backlog
        link = self.link
        limit = self.batch_bytes
        resend_at = ticks_ms()
        misses = 0  # passes in a row without an ack: the pause before resending grows
        connects = link.connects
        while True:
            await self.recorded.wait()  # a reading, a new connection, or tick()
            self.recorded.clear()
            if link.connects != connects:  # a new connection: send at once
                connects = link.connects
                resend_at = ticks_ms()
            try:
                resend_at, misses = await self._forward_batches(limit, resend_at, misses)
            except Exception as e:  # never let the forwarder die: the log keeps everything
                self.errors += 1
                log("forward: %r" % (e,))
            if log_.flush_due():
                log_.flush()

    async def _forward_batches(self, limit, resend_at, misses):
        # One pass over the log while the link is up; returns the state the
        # forwarder keeps between passes. A pass starts at the log's cursor,
        # so whatever was in flight when the last one ended goes again (the
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
                start = inflight[-1][1][0] if inflight else None
                if inflight and start is None:
                    break  # readings from RAM are in flight: they go alone
                count, size, token = log_.next_batch(limit, start)
                if not count:
                    break
                prev = inflight[-1][0] if inflight else -1
                sending += count
                begin, end, last = self._lay_out(size, prev, log_.backlog() - sending)
                # Not waiting for each PUBACK: the window is the flow control.
                number = link.send(self.topics["batch"], self.packet, begin, end)
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
                log("forward: no ack for seq %d in %d ms; sending again in %d ms" % (inflight[0][0], ack_timeout, pause))
                break
            misses = 0
            # One cursor write for every batch this ack covers (the oldest
            # one at least: that is what was waited for).
            token = inflight.pop(0)[1]
            count = token[1]
            while inflight and inflight[0][0] <= self.stored_seq and inflight[0][2] <= link.pubacked:
                token = inflight.pop(0)[1]
                count += token[1]
            log_.ack(token if token[0] is None else (token[0], count, 0, 0))
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
            # Woken by the ack, or by tick() within _TICK_MS: a link that
            # drops, or the timeout, is noticed then.
            await self.stored.wait()
            self.stored.clear()
        return True

    async def tick(self):
        # The device's clock. Every _TICK_MS it feeds the watchdog, keeps
        # the link alive (Link.keepalive), wakes whoever waits for the
        # gateway's ack (`stored`) and, every flush_ms, the forwarder
        # (`recorded`), so that they notice a timeout, a pause ended, a
        # flush due or a link gone. Cheaper than asyncio.wait_for_ms, whose
        # task and closures cost each wait about 0.9 KB of heap while it
        # lasts, allocated anew each time (measured in the unix port): the
        # forwarder waited so all along.
        # The watchdog is fed by the event loop itself: if any task blocks
        # the loop for longer than its timeout (every socket operation is
        # bounded well below it), the board resets. Started here, after the
        # settings are good, so a board waiting for usable settings is never
        # reset. Long enough for the slowest bounded step, a connect of
        # several socket operations (the profile caps it where the port must).
        dog = profile.watchdog(max(8000, 6 * self.settings["socket_timeout_ms"]))
        if dog is not None:
            self.link.feed = dog.feed  # fed between the connect's steps too
        woke = ticks_ms()
        while True:
            if dog is not None:
                dog.feed()
            await asyncio.sleep_ms(_TICK_MS)
            self.link.keepalive()
            self.stored.set()
            if ticks_diff(ticks_ms(), woke) >= self.backlog.flush_ms:
                woke = ticks_ms()
                self.recorded.set()

    def _lay_out(self, size, prev, waiting):
        # The batch the log put in the packet buffer, records framed as on
        # flash ([length: u16][crc32: u32][body] each, in the `size` bytes
        # from _payload_at), made the batch's JSON where it lies: each
        # 6-byte header becomes JSON whitespace and punctuation of the same
        # length, the envelope goes in front and "\n]}" after. One record
        # per line (indented): the gateway takes each record's bytes as
        # they are instead of parsing the batch whole and encoding every
        # record again. `waiting`: readings on the board after this batch
        # and the ones in flight before it. Returns (start, end) of the
        # payload in the packet buffer, and the last record's seq.
        packet = self.packet
        at = self._payload_at
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
        return at - len(head), end + 3, _seq_of(packet, p + 6, end)

    # -- incoming messages ---------------------------------------------------------
    def _on_message(self, topic, payload, discarded):
        if topic == self.topics["ack"]:
            # Handled here, not queued: the forwarder is waiting for it.
            # Length first: int()'s error for a bad payload holds a copy of
            # all of it, which a 4 KB payload's heap may not have room for.
            try:
                seq = int(payload) if 0 < len(payload) <= 20 else None
            except ValueError:
                seq = None
            if seq is None:
                log("ack: not a sequence number: %r" % payload[:32])
                return
            if seq > self.stored_seq:
                self.stored_seq = seq
                self.stored.set()
            return
        self.inbox.put((topic, payload, discarded))

    async def dispatch(self):
        inbox = self.inbox
        while True:
            await inbox.ready.wait()
            inbox.ready.clear()
            while inbox.count:
                topic, payload, discarded = inbox.get()
                if await self._import_code(topic):
                    try:
                        self.handle(topic, payload, discarded)
                    except Exception as e:  # one bad message must not stop the board
                        self.errors += 1
                        log("message on %s failed: %r" % (topic, e))
                elif topic == self.topics["cmd"]:
                    self._no_heap_for_command(payload)
                else:
                    log("message on %s dropped: no heap for its code" % topic)
                topic = payload = None  # not kept alive while the inbox is empty
                _let_go()

    def _code_for(self, topic):
        # The cold module (_COLD) that handles messages on `topic`, if any.
        if topic == self.topics["cmd"]:
            return "commands"
        if topic == self.topics["config"]:
            return "config"
        if topic == self.fleet_topics["query"]:
            return "query"
        return None

    async def _import_code(self, topic):
        # The code a message needs is imported before anything is done
        # with it. An import asks for a few hundred small blocks; on a
        # fragmented heap it can fail where the message itself would fit,
        # and then costs only time: the message waits while the other
        # tasks run, and tries again. False when it never fitted.
        name = self._code_for(topic)
        if name is None:
            return True
        for attempt in range(_CODE_TRIES):
            try:
                __import__(name)
                if attempt:
                    log("message on %s: its code imported at try %d" % (topic, attempt + 1))
                return True
            except MemoryError:
                await asyncio.sleep_ms(_CODE_RETRY_MS)
        return False

    def handle(self, topic, payload, discarded):
        if discarded:
            log("message on %s dropped: %d bytes is over max_payload" % (topic, discarded))
            if topic == self.topics["config"]:
                self._config().reject("payload of %d bytes is over max_payload" % discarded)
            elif topic == self.topics["cmd"]:
                self._commands().reject("payload of %d bytes is over max_payload" % discarded)
            return
        if topic == self.topics["ping"]:
            self.link.publish(self.topics["pong"], payload, False, 0)
        elif topic == self.topics["config"]:
            config = self._config()
            config.receive(payload)
            if config.version != self.config_version:
                self.config_version = config.version
                # The birth says which version is in force: say it again
                # (retained, as at connect) so the registry is not left behind.
                self.link.publish(self.topics["status"], self._birth(), True, 1)
        elif topic == self.fleet_topics["query"]:
            self.answer(payload)
        elif topic == self.topics["display"] or topic == self.fleet_topics["display"]:
            self.show(to_text(payload, 256))
        elif topic == self.topics["cmd"]:
            self._commands().receive(payload, self.board.time_s())
            if self.reboot_requested:
                self.stopped.set()  # the result is out (QoS 1, acknowledged): now reboot

    def _no_heap_for_command(self, payload):
        # Not even the commands' code could be imported (_import_code):
        # answer as Commands answers a MemoryError of its own, rather than
        # leave the command without one. It did not run.
        gc.collect()
        try:
            command_id = json.loads(payload)["id"]
        except Exception:
            command_id = None
        if not isinstance(command_id, str):
            command_id = None
        log("cmd %s: out of memory" % command_id)
        self._report_command(json.dumps({"id": command_id, "status": "failed", "error": "out of memory on the board"}).encode())

    # -- main loop -----------------------------------------------------------------
    async def keep_running(self, name, task, pause_ms=1000):
        # Each task loops forever and catches what it expects; anything else
        # (a MemoryError on a fragmented heap, a bug) is logged, counted, and
        # the task starts again after a pause, so the board never silently
        # stops recording or forwarding. The log in flash keeps the readings.
        while True:
            try:
                await task()
            except Exception as e:
                self.errors += 1
                log("%s stopped: %r; restarting in %d ms" % (name, e, pause_ms))
                gc.collect()
                await asyncio.sleep_ms(pause_ms)

    async def run(self):
        # Where the code runs from: a ROM partition (in place, no heap), .mpy or source.
        where = " from ROM" if __file__.startswith("/rom/") else " from .mpy" if __file__.endswith(".mpy") else ""
        log("device %s: %s firmware %s%s, boot %d (%s)" % (self.id, profile.NAME, self.firmware, where, self.state.boots, profile.reset_cause()))
        asyncio.create_task(self.keep_running("link", self.link.run))
        asyncio.create_task(self.keep_running("dispatch", self.dispatch))
        asyncio.create_task(self.keep_running("forward", self.forward))
        asyncio.create_task(self.keep_running("telemetry", self.telemetry.run))
        asyncio.create_task(self.tick())
        await self.stopped.wait()
        self.link.close()

    def release(self):
        # Stopped for good: let go of everything built at boot, every
        # attribute, so that should anything still point at this Device
        # (MicroPython's GC is conservative: a stale register will do) it
        # holds no buffers the next boot, in this same heap, needs. main()
        # runs each boot in a frame of its own for the same reason (_boot).
        for name in self.__dict__:  # a copy in MicroPython, and no key is added
            setattr(self, name, None)


def load_settings(protocol):
    # Retry with backoff until the settings are usable; one clear line each time.
    import settings as settings_mod

    delay = 1000
    while True:
        try:
            return settings_mod.load(protocol["settings"])
        except settings_mod.SettingsError as e:
            log("settings error: %s; retrying in %d s" % (e.args[0], delay // 1000))
        sleep_ms(delay)
        delay = min(delay * 2, 60000)


def too_old(minimum, version=None):
    # The MicroPython version when it is older than `minimum` ("1.22"), else None.
    if version is None:
        version = sys.implementation.version
    wanted = tuple(int(part) for part in minimum.split("."))
    return "%d.%d.%d" % tuple(version[:3]) if tuple(version[: len(wanted)]) < wanted else None


def _check_version():
    from settings import load_protocol

    protocol = load_protocol()
    minimum = protocol.get("micropython_min")
    old = minimum and too_old(minimum)
    if old:
        # Said at every boot, then carried on: most things may still work,
        # and a board that refuses to start cannot be reached to update it.
        log("MicroPython %s is older than %s, the oldest this firmware supports: update the board's MicroPython" % (old, minimum))


def _device_protocol():
    # The settings, and what a Device needs of protocol.json: the file
    # takes about 11 KB of heap as objects on the 64-bit unix port
    # (measured; about half on a board), of which the device keeps under
    # 1 KB. Read in a function of its own, so that none of the rest is
    # still reachable (a stale frame slot will do, the GC being
    # conservative) when the Device asks for its buffers: on a small heap
    # the two did not fit at once, and the board could not boot.
    from settings import load_protocol

    protocol = load_protocol()
    return load_settings(protocol), {
        "firmware": protocol["firmware"],
        "topic_root": protocol["topic_root"],
        "topics": list(protocol["topics"]),
        "fleet_topics": list(protocol["fleet_topics"]),
        # Without the "about" texts, which are for people and cost heap.
        "config": {key: {k: v for k, v in rule.items() if k != "about"} for key, rule in protocol["config"].items()},
    }


def _new_device():
    settings, protocol = _device_protocol()
    gc.collect()
    device = Device(settings, protocol)
    _let_go()  # what only the boot needed
    return device


def _boot():
    # One boot, from building the Device to its stop; True when it asked
    # for a reboot. A function of its own for the heap's sake: MicroPython's
    # GC is conservative and scans the whole frame of every function still
    # running, stale slots included. Left in main(), the stopped device's
    # temporaries kept its link, log and tasks (17 KB at 128k, measured in
    # the VM) alive into the next boot, which then failed for want of them.
    # Once this returns, its frame is off the stack and no longer scanned.
    device = _new_device()
    try:
        gc.collect()
        asyncio.run(device.run())
        return device.reboot_requested
    finally:
        device.release()


def main():
    _check_version()
    _let_go()
    while True:
        gc.collect()
        try:
            if _boot():
                log("rebooting")
                profile.reset()  # real boards do not come back from this
        except KeyboardInterrupt:
            raise
        except Exception as e:
            # Last line of defence: say what happened and start over rather
            # than sit dead. (Real boards also have the watchdog.)
            log("firmware error, restarting in 5 s:")
            sys.print_exception(e)
            sleep_ms(5000)
        asyncio.new_event_loop()
