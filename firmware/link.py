# The link to the broker: WiFi, MQTT session, keepalive, reconnect.
#
# umqtt.simple does the MQTT encoding; this module owns everything about
# keeping a session alive on a board: a persistent session (clean_session
# False) so QoS 1 messages wait for us while offline, a retained last will
# and birth message for presence, our own keepalive pings (umqtt.simple
# sends none, and nats-server drops a client that is silent for
# 1.5 x keepalive), and reconnection with capped exponential backoff and
# jitter so a fleet does not reconnect in lockstep after a broker restart.
# The bytes it frames itself are mqttframe's.
import asyncio
import errno
import random
from asyncio import core  # pyright: ignore[reportAttributeAccessIssue]  (the stubs leave it out)
from micropython import const
from time import ticks_add, ticks_diff, ticks_ms

from umqtt import simple
from mqttframe import HEADER_ROOM, PUBACK, PUBLISH, next_pid, put_publish_header
from mqttsocket import SocketFactory

# One deadline for the whole connect (address, TCP, CONNACK, every SUBACK,
# the birth's PUBACK): under the watchdog's 8 s (the Pico W's caps at 8.3 s).
CONNECT_MS = const(6000)
# Credentials refused: retry after 10 s at least, growing to 5 minutes.
_REFUSED_MIN_MS = const(10000)
_REFUSED_MAX_MS = const(300000)
# Errors that mean "this connection is unusable": socket errors, a refused
# or malformed CONNACK (umqtt.simple asserts on it), a short read.
LINK_ERRORS = (OSError, simple.MQTTException, AssertionError, IndexError, ValueError)


def _readable(raw):
    # Resumes once the socket `raw` has bytes, or is closed (its read then
    # fails): what asyncio's StreamReader.read waits on before it reads,
    # without the stream module, whose import costs heap for good.
    # core._io_queue is looked up at each wait, as the
    # stream does: asyncio.new_event_loop() replaces it.
    yield core._io_queue.queue_read(raw)


def backoff_ms(attempt, low, high):
    # Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"):
    # a random delay between low and low * 2**attempt, capped at high.
    ceiling = low << min(attempt, 16)
    if ceiling > high:
        ceiling = high
    return low + random.getrandbits(24) % (ceiling - low + 1)


def refused(error):
    # CONNACK 4 (bad username or password) or 5 (not authorized): trying
    # again soon changes nothing, and a fleet of refused boards retrying
    # every second is a load on the server.
    return isinstance(error, simple.MQTTException) and error.args and error.args[0] in (4, 5)


def describe(error):
    # One readable phrase for the console and status.
    if isinstance(error, OSError) and error.args and error.args[0] == -1:
        return "connection closed by the broker"  # umqtt.simple's code for EOF
    if isinstance(error, OSError) and error.args and error.args[0] == errno.ETIMEDOUT:
        return "no answer from the broker within socket_timeout_ms"
    if refused(error):
        return "credentials refused by the broker: revoked or wrong (CONNACK %d)" % error.args[0]
    if isinstance(error, simple.MQTTException):
        return "broker refused the connection (CONNACK code %s)" % error.args[0]
    if isinstance(error, AssertionError):
        return "unexpected reply from the broker"
    return str(error) or type(error).__name__


class Link:
    def __init__(self, client_id, settings, board, nodelay, status_topic, on_message, log, packet=None):
        self.id = client_id
        self.settings = settings
        self.board = board
        self.status_topic = status_topic
        self.on_message = on_message  # called as on_message(topic, payload, discarded_len)
        self.log = log
        self.keepalive_ms = settings["keepalive_s"] * 1000
        # `packet`: the buffer every packet is gathered in, kept across
        # connections (the device's, sized for a batch; see send()).
        if packet is None:
            packet = bytearray(512)
        self.sockets = SocketFactory(settings["socket_timeout_ms"], settings["max_payload"], nodelay, packet)
        self.subscriptions = []  # (topic, qos), restored on every connect
        self.birth = None  # payload (or a function making it) published retained on status_topic after connect
        self.will = None
        self.client = None
        self.sock = None
        self.connected = False
        self.up = asyncio.Event()
        self.connects = 0
        self.last_error = None
        self.credentials_refused = False  # the last connect was refused them (see run)
        self.on_up = None  # called after every (re)connect, once the birth is out
        # send()'s packets on this connection, and the PUBACKs for them so
        # far: the broker sends those in order (MQTT 3.1.1, 4.6).
        self.sent = 0
        self.pubacked = 0
        self.ping_sent = None  # keepalive()'s: when the unanswered ping went, if one did
        self.last_ping = 0
        self.connect_ms = CONNECT_MS
        self.feed = None  # the watchdog's feed, called between the connect's steps

    def subscribe(self, topic, qos=0):
        self.subscriptions.append((topic, qos))

    # -- publishing, used by the rest of the firmware -------------------------

    def publish(self, topic, payload, retain=False, qos=0):
        # Returns True once the broker has it (QoS 1: after the PUBACK).
        # Never raises: a failure takes the link down and returns False.
        if not self.connected:
            return False
        client = self.client
        try:
            if qos:
                next_pid(client)
            client.publish(topic, payload, retain, qos)
            self.sock.flush()
            if qos:
                # umqtt.simple read every PUBACK up to this one's, send()'s
                # among them: all of those are in.
                self.pubacked = self.sent
            return True
        except LINK_ERRORS as e:
            self._drop(e)
            return False
        except MemoryError as e:
            # Part of the packet may be gathered already: the stream is no
            # longer in step, so the connection goes. The caller decides
            # whether to try smaller.
            self._drop(e)
            raise

    def send(self, topic, packet, start, end):
        # A QoS 1 publish of packet[start:end] that does not wait for its
        # PUBACK, as umqtt.simple's does: forwarding a backlog one round
        # trip per batch left a board idle half the time. The payload is
        # sent where it lies, in one write, its header in front of it
        # (mqttframe.put_publish_header). Returns the packet's number on this
        # connection (compare with `pubacked`), or 0 when the link is down.
        if start < HEADER_ROOM + len(topic):
            raise ValueError("no room for the packet's header")
        if not self.connected:
            return 0
        client = self.client
        try:
            next_pid(client)
            client.pid += 1
            at = put_publish_header(packet, start, end, topic, client.pid)
            self.sock.send(memoryview(packet)[at:end])
        except LINK_ERRORS as e:
            self._drop(e)
            return 0
        except MemoryError as e:
            self._drop(e)  # part of the packet may be gathered: out of step
            raise
        self.sent += 1
        return self.sent

    # -- connection lifecycle ---------------------------------------------------

    async def run(self):
        attempt = 0
        while True:
            try:
                await self._wifi()
                self._connect()
                attempt = 0
                if self.on_up:
                    self.on_up()
                await self._serve()
            except Exception as e:  # LINK_ERRORS, or MemoryError mid-packet: the connection is unusable
                self._drop(e)
            low, high = self.settings["reconnect_min_ms"], self.settings["reconnect_max_ms"]
            if self.credentials_refused:
                low, high = max(low, _REFUSED_MIN_MS), max(high, _REFUSED_MAX_MS)
            delay = backoff_ms(attempt, low, high)
            attempt += 1
            self.log("link: down (%s), retry in %d ms" % (self.last_error, delay))
            await asyncio.sleep_ms(delay)

    async def _wifi(self):
        board = self.board
        if board.wifi_isconnected():
            return
        self.log("link: joining WiFi %r" % self.settings["wifi_ssid"])
        board.wifi_connect(self.settings["wifi_ssid"], self.settings["wifi_password"])
        deadline = ticks_add(ticks_ms(), 20000)
        while not board.wifi_isconnected():
            if ticks_diff(deadline, ticks_ms()) <= 0:
                raise OSError("WiFi: %s" % board.wifi_status())
            await asyncio.sleep_ms(250)
        board.wifi_joined()

    def _connect(self):
        # Blocks the loop, every step bounded by one deadline (connect_ms)
        # and the watchdog fed between them (see SocketFactory).
        sockets = self.sockets
        until = sockets.until = ticks_add(ticks_ms(), self.connect_ms)
        sockets.feed = self.feed
        try:
            self._handshake()
        except OSError as e:
            if e.args and e.args[0] == errno.ETIMEDOUT and ticks_diff(until, ticks_ms()) <= 0:
                raise OSError("no answer from the broker within the connect's %d ms" % self.connect_ms)
            raise
        finally:
            sockets.until = sockets.feed = None
            if self.sock is not None:
                self.sock.until = self.sock.feed = None
        self.connects += 1
        self.up.set()
        s = self.settings
        self.log("link: up (%s:%d)" % (s["mqtt_host"], s["mqtt_port"]))

    def _handshake(self):
        s = self.settings
        client = simple.MQTTClient(
            self.id, s["mqtt_host"], s["mqtt_port"], s["mqtt_user"], s["mqtt_password"], s["keepalive_s"]
        )
        client.set_callback(self._deliver)
        if self.will:
            client.set_last_will(self.status_topic, self.will, True, 1)
        # See SocketFactory: bounded connect, TCP_NODELAY. The ESP32 port's
        # stub of its frozen umqtt.simple leaves out the module's own
        # `import socket`, which this replaces.
        simple.socket = self.sockets  # pyright: ignore[reportAttributeAccessIssue]
        self.client = client
        self.sock = None
        self.sent = self.pubacked = 0
        self.ping_sent = None
        self.last_ping = ticks_ms()
        self.sockets.last = None
        try:
            client.connect(False)
        finally:
            self.sock = self.sockets.last
        self.connected = True
        # Subscribe before announcing: "online" means ready to receive.
        for topic, qos in self.subscriptions:
            if self.feed is not None:
                self.feed()
            try:
                client.subscribe(topic, qos)
            except simple.MQTTException as e:
                # SUBACK 0x80: not this board's topic by its credentials.
                # The rest still works; said once per connection.
                self.log("link: subscription to %s refused by the broker (code %s): are these credentials this board's?"
                         % (topic.decode(), e.args[0]))
        if self.birth:
            birth = self.birth() if callable(self.birth) else self.birth
            client.publish(self.status_topic, birth, True, 1)
        self.sock.flush()

    async def _serve(self):
        # Wait for the broker without blocking the loop; read each packet
        # through umqtt.simple once its first byte is here. No timeout on
        # the wait: pings are keepalive()'s, on the device's clock (a wait
        # with one, asyncio.wait_for_ms, costs a task and closures per read).
        sock = self.sock
        raw = sock.sock  # non-blocking
        while self.connected:
            try:
                await _readable(raw)  # pyright: ignore[reportGeneralTypeIssues]  (MicroPython awaits generators)
                first = raw.read(1)
            except OSError:
                if not self.connected:
                    return  # taken down meanwhile, its socket closed: why is said already
                raise
            if not self.connected:
                return
            if first is None:
                continue  # woken with nothing to read after all
            if not first:
                raise OSError("connection closed by the broker")
            sock.first = first
            op = self.client.wait_msg()
            if op and op & 0xF0 != PUBLISH:
                sock.skip_packet()
                if op == PUBACK:
                    self.pubacked += 1  # one of send()'s (publish() reads its own)

    def keepalive(self):
        # Called on the device's clock (a few times a second): a ping every
        # half keepalive (umqtt.simple sends none, and nats-server drops a
        # client silent for 1.5 x keepalive), and the link taken down when
        # the last one went unanswered that long. Taking it down closes the
        # socket, which wakes _serve's wait (with an error), and run() says
        # why and reconnects.
        if not self.connected:
            return
        now = ticks_ms()
        if ticks_diff(now, self.last_ping) < self.keepalive_ms // 2:
            return
        sock = self.sock
        if self.ping_sent is not None and ticks_diff(sock.rx_ticks, self.ping_sent) < 0:
            self._drop(OSError("no answer to ping in %d ms" % ticks_diff(now, self.ping_sent)))
            return
        try:
            self.client.ping()
            sock.flush()
        except LINK_ERRORS as e:
            self._drop(e)
            return
        self.ping_sent = self.last_ping = now

    def _deliver(self, topic, payload):
        # Runs inside umqtt.simple's read; hand over and return quickly.
        discarded = self.sock.discarded
        self.sock.discarded = 0
        self.on_message(topic, payload, discarded)

    def _drop(self, error):
        self.last_error = describe(error)
        self.credentials_refused = refused(error)
        self.connected = False
        self.up.clear()
        if self.sock:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None

    def close(self):
        # Orderly goodbye: the broker does not send the last will after a
        # DISCONNECT, so say offline first.
        if self.connected:
            if self.will:
                self.publish(self.status_topic, self.will, True, 1)
            try:
                self.client.disconnect()
            except LINK_ERRORS:
                pass
        self._drop("closed")
