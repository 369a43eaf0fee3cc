# A board running the fleet firmware: everything it is made of is created
# here, at boot, and held by one Device object (no module-level state), so a
# single VM can host several simulated boards.
import asyncio
import gc
import json
import sys
from time import sleep_ms, ticks_ms

import board as profile
import settings as settings_mod
from link import Link
from state import DeviceState
from telemetry import Telemetry

FIRMWARE_VERSION = "0.1.0"


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
        self.firmware = protocol.get("firmware", FIRMWARE_VERSION)
        root = "%s/%s/" % (protocol["topic_root"], self.id)
        self.topics = {name: (root + name).encode() for name in protocol["topics"]}
        self.inbox = Inbox(8)
        self.link = Link(self.id, settings, self.board, profile.TCP_NODELAY, self.topics["status"], self._on_message, log)
        self.link.will = self._presence(False)
        self.link.birth = self._presence(True)
        self.link.subscribe(self.topics["ping"], 0)
        self.telemetry = Telemetry(self, settings["telemetry_interval_ms"])
        self.unsent = 0  # readings lost while offline (until store-and-forward)
        self.errors = 0

    def _presence(self, online):
        return json.dumps(
            {
                "online": online,
                "id": self.id,
                "board": profile.NAME,
                "firmware": self.firmware,
                "boots": self.state.boots,
                "reset": profile.reset_cause(),
            }
        ).encode()

    # -- telemetry ---------------------------------------------------------------
    def record(self, reading):
        # The one door for readings. Store-and-forward takes this over: then
        # the reading goes to the flash log and is forwarded from there.
        reading["seq"] = self.state.next_seq()
        reading["ts"] = self.board.time_s()
        reading["boot"] = self.state.boots
        if not self.link.publish(self.topics["telemetry"], json.dumps(reading).encode(), False, 1):
            self.unsent += 1

    # -- incoming messages ---------------------------------------------------------
    def _on_message(self, topic, payload, discarded):
        self.inbox.put((topic, payload, discarded))

    async def dispatch(self):
        inbox = self.inbox
        while True:
            await inbox.ready.wait()
            inbox.ready.clear()
            while inbox.count:
                topic, payload, discarded = inbox.get()
                try:
                    self.handle(topic, payload, discarded)
                except Exception as e:  # one bad message must not stop the board
                    self.errors += 1
                    log("message on %s failed: %r" % (topic, e))

    def handle(self, topic, payload, discarded):
        if discarded:
            log("message on %s dropped: %d bytes is over max_payload" % (topic, discarded))
            return
        if topic == self.topics["ping"]:
            self.link.publish(self.topics["pong"], payload, False, 0)

    # -- main loop -----------------------------------------------------------------
    async def run(self):
        log("device %s: %s firmware %s, boot %d (%s)" % (self.id, profile.NAME, self.firmware, self.state.boots, profile.reset_cause()))
        asyncio.create_task(self.link.run())
        asyncio.create_task(self.dispatch())
        await self.telemetry.run()


def load_settings(protocol):
    # Retry with backoff until the settings are usable; one clear line each time.
    delay = 1000
    while True:
        try:
            return settings_mod.load(protocol["settings"])
        except settings_mod.SettingsError as e:
            log("settings error: %s; retrying in %d s" % (e.args[0], delay // 1000))
        sleep_ms(delay)
        delay = min(delay * 2, 60000)


def main():
    protocol = settings_mod.load_protocol()
    while True:
        settings = load_settings(protocol)
        gc.collect()
        try:
            asyncio.run(Device(settings, protocol).run())
        except KeyboardInterrupt:
            raise
        except Exception as e:
            # Last line of defence: say what happened and start over rather
            # than sit dead. (Real boards also have the watchdog.)
            log("firmware error, restarting in 5 s:")
            sys.print_exception(e)
            sleep_ms(5000)
        asyncio.new_event_loop()
