# A board running the fleet firmware: everything it is made of is created
# here, at boot, and held by one Device object (no module-level state), so a
# single VM can host several simulated boards. The Device wires the parts
# together (link, log, forwarder, telemetry, the cold code for commands,
# configuration and queries) and handles what arrives; startup.py boots it.
import asyncio
import gc
import json
from time import ticks_diff, ticks_ms

from micropython import const

import board as profile
from backlog import BacklogLog, area_size
from display import render, to_text
from forwarder import Forwarder, batch_bytes_for, payload_offset
from link import Link
from state import DeviceState
from telemetry import Telemetry

import coldcode  # last: from source it imports the cold code, after what always runs

_TICK_MS = const(250)  # see tick()


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
        # and the forwarder's batches are read into it by the log and sent
        # from where they lie. One buffer, allocated once.
        heap = gc.mem_alloc() + gc.mem_free()
        self.batch_bytes = batch_bytes_for(settings["batch_bytes"], heap)
        if self.batch_bytes < settings["batch_bytes"]:
            log("forward: batches of %d bytes, not %d, on a heap of %d KB" % (self.batch_bytes, settings["batch_bytes"], heap // 1024))
        at = payload_offset(self.topics["batch"])
        area = area_size(self.batch_bytes)
        self.packet = bytearray(at + area + 3)  # 3: the batch's closing "\n]}"
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
        self.backlog = BacklogLog(
            "log", settings["backlog_budget"], max(1024, settings["backlog_budget"] // 16),
            settings["flush_records"], settings["flush_ms"],
            read_area=memoryview(self.packet)[at:at + area],
        )
        self.forwarder = Forwarder(self.link, self.backlog, self.packet, at, self.topics["batch"], settings,
                                   self.batch_bytes, log)
        self.link.on_up = self.forwarder.wake  # forward the backlog as soon as the link is up
        self.telemetry = Telemetry(self.board, self.backlog, self.started, self.record, settings["telemetry_interval_ms"])
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

    def _config(self):
        # A Config for one message, at the version in force (cold code).
        import config

        return config.Config(self.config_schema, self._apply_config, self._report_config, log,
                             version=self.config_version)

    def _commands(self):
        # Commands for one message (cold code): what they keep is on flash.
        import commands

        return commands.Commands(self, self._report_command, log)

    # What commands do to the board (commands.py calls only these, info()
    # and show()).
    def flush(self):
        # The readings in RAM to flash, and the forwarder woken to send them.
        self.backlog.flush()
        self.forwarder.wake()
        return self.backlog.backlog()

    def reboot(self):
        self.reboot_requested = True  # after the result is out: see handle()

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
            "errors": self.errors + self.forwarder.errors,  # failures the tasks survived
            "forwarded": self.forwarder.forwarded,  # readings acknowledged by the broker this boot
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
        self.forwarder.wake()
        return True

    async def tick(self):
        # The device's clock. Every _TICK_MS it feeds the watchdog, keeps
        # the link alive (Link.keepalive) and lets the forwarder notice a
        # timeout, a pause ended, a flush due or a link gone.
        # The watchdog is fed by the event loop itself: if any task blocks
        # the loop for longer than its timeout (every socket operation is
        # bounded well below it), the board resets. Started here, after the
        # settings are good, so a board waiting for usable settings is never
        # reset. Long enough for the slowest bounded step, a connect of
        # several socket operations (the profile caps it where the port must).
        dog = profile.watchdog(max(8000, 6 * self.settings["socket_timeout_ms"]))
        if dog is not None:
            self.link.feed = dog.feed  # fed between the connect's steps too
        while True:
            if dog is not None:
                dog.feed()
            await asyncio.sleep_ms(_TICK_MS)
            self.link.keepalive()
            self.forwarder.tick()

    # -- incoming messages ---------------------------------------------------------
    def _on_message(self, topic, payload, discarded):
        if topic == self.topics["ack"]:
            self.forwarder.acked(payload)  # handled here, not queued: the forwarder is waiting for it
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
                coldcode.let_go()

    def _code_for(self, topic):
        # The cold module (coldcode.COLD) that handles messages on `topic`, if any.
        if topic == self.topics["cmd"]:
            return "commands"
        if topic == self.topics["config"]:
            return "config"
        if topic == self.fleet_topics["query"]:
            return "query"
        return None

    async def _import_code(self, topic):
        # The code a message needs is imported before anything is done
        # with it (coldcode.load); False when it never fitted the heap.
        name = self._code_for(topic)
        if name is None:
            return True
        tries = await coldcode.load(name)
        if tries > 1:
            log("message on %s: its code imported at try %d" % (topic, tries))
        return tries > 0

    def handle(self, topic, payload, discarded):
        if discarded:
            # Drained unread: larger than max_payload, or (payload None) no
            # block that large on the heap when it came.
            why = "is over max_payload" if payload is not None else "found no room on the board's heap"
            log("message on %s dropped: %d bytes %s" % (topic, discarded, why))
            if topic == self.topics["config"]:
                self._config().reject("payload of %d bytes %s" % (discarded, why))
            elif topic == self.topics["cmd"]:
                self._commands().reject("payload of %d bytes %s" % (discarded, why))
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
        asyncio.create_task(self.keep_running("forward", self.forwarder.run))
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
        for part in (self.forwarder, self.telemetry, self):
            for name in part.__dict__:  # a copy in MicroPython, and no key is added
                setattr(part, name, None)

