# The socket umqtt.simple talks through.
#
# umqtt.simple writes each packet in several small writes and reads with
# plain blocking calls. This wrapper gives it what a board on a flaky link
# needs without changing the library:
# - one write per packet: writes are gathered and sent when umqtt.simple
#   next reads, or when the link calls flush(), so Nagle's algorithm (on by
#   default in lwIP) never holds back the tail of a packet;
# - every read and write is bounded by a deadline (the real socket is
#   non-blocking and waited on with poll), so a black-holed link raises
#   OSError instead of hanging the board;
# - payloads larger than max_read are drained and discarded, not allocated,
#   and so is one the heap has no block for (read() returns None);
# - while the link connects, every step also ends by one deadline for the
#   whole sequence (`until`), and the watchdog is fed before each (`feed`).
import errno
import select
import socket
from time import ticks_add, ticks_diff, ticks_ms

from mqttframe import read_length

_POLLIN = select.POLLIN
_POLLOUT = select.POLLOUT
# Reads up to this size (headers, topics, small payloads) come back as
# bytes; larger ones as a bytearray read in place (see _read_into).
_COPY_MAX = 256


class PacketSocket:
    def __init__(self, timeout_ms, max_read, nodelay=None, out=None, until=None, feed=None):
        self.sock = socket.socket()
        self.timeout_ms = timeout_ms
        self.until = until  # ticks_ms() by which the connect sequence is over, or None
        self.feed = feed  # the watchdog's feed, or None
        self.max_read = max_read
        self.nodelay = nodelay  # (level, option) from the board profile, or None
        self.poller = select.poll()
        # Given by the factory, sized once for the largest packet the board
        # usually sends (a batch) and kept across connections, so the heap
        # stays steady and a fragmented heap is asked for this block once,
        # at boot, not at every reconnect mid-outage.
        self.out = bytearray(128) if out is None else out
        self.n = 0  # bytes gathered in self.out, not yet sent
        self.blocking = True
        self.first = None  # first byte of a packet, already read by the link
        self.discarded = 0  # size of the last payload dropped for being too large
        self.rx_ticks = ticks_ms()

    # Called by umqtt.simple.connect(), which builds the socket through us.
    def connect(self, addr):
        s = self.sock
        left = ticks_diff(self._deadline(), ticks_ms())
        if left <= 0:
            raise OSError(errno.ETIMEDOUT)
        if self.feed is not None:
            self.feed()
        s.settimeout(left / 1000)  # bounds the TCP handshake
        if self.nodelay:
            try:
                s.setsockopt(self.nodelay[0], self.nodelay[1], 1)
            except OSError:
                self.nodelay = None  # the port has no TCP_NODELAY: single writes still help
        s.connect(addr)
        s.setblocking(False)
        self.poller.register(s, _POLLIN)

    def settimeout(self, seconds):
        # umqtt.simple 1.4 and later (frozen into the ESP32 firmware, where
        # it is imported before /lib's copy) call this before connect();
        # None means "no timeout", which a board on a flaky link never wants.
        if seconds is not None:
            self.timeout_ms = int(seconds * 1000)

    def setblocking(self, flag):
        # umqtt.simple toggles this around check_msg(); the real socket stays
        # non-blocking and our deadlines do the waiting.
        self.blocking = flag

    def write(self, buf, n=-1):
        if isinstance(buf, str):  # umqtt.simple passes the client id and credentials as given
            buf = buf.encode()
        if n < 0:
            n = len(buf)
        end = self.n + n
        if end > len(self.out):
            # Grown to fit, in 512-byte steps: doubling would ask a
            # fragmented heap for twice the biggest packet.
            grown = bytearray((end + 511) & ~511)
            grown[: self.n] = self.out[: self.n]
            self.out = grown
        self.out[self.n : end] = memoryview(buf)[:n]
        self.n = end
        return n

    def flush(self):
        if self.n:
            self._send(memoryview(self.out)[: self.n])
            self.n = 0

    def send(self, packet):
        # A whole packet (a memoryview) sent as it lies, after anything
        # gathered: a batch, built in place in the device's packet buffer.
        self.flush()
        self._send(packet)

    def _send(self, view):
        sent = 0
        deadline = self._deadline()
        while sent < len(view):
            k = self.sock.write(view[sent:])
            if k is None:  # send buffer full
                self._wait(_POLLOUT, deadline)
            else:
                sent += k

    def read(self, n):
        self.flush()
        if not n:
            # umqtt.simple reads an empty payload (a cleared retained
            # message, `mosquitto_pub -n`) as read(0): nothing to wait for.
            return b""
        if self.first is not None:
            first = self.first
            self.first = None
            return first
        if not self.blocking:
            # check_msg(): answer at once when nothing is waiting.
            data = self.sock.read(n)
            if data:
                self.rx_ticks = ticks_ms()
            return data
        if n > self.max_read:
            return self._discard(n)
        deadline = self._deadline()
        if n > _COPY_MAX:
            return self._read_into(n, deadline)
        buf = None
        while True:
            data = self.sock.read(n if buf is None else n - len(buf))
            if data is None:
                self._wait(_POLLIN, deadline)
                continue
            if not data:
                if buf is None and n == 1:
                    return data  # umqtt.simple turns this into OSError(-1)
                raise OSError(errno.ECONNRESET)
            self.rx_ticks = ticks_ms()
            if buf is None:
                if len(data) == n:
                    return data  # the usual case: no copy
                buf = bytearray(data)
            else:
                buf.extend(data)
            if len(buf) == n:
                return bytes(buf)

    def _read_into(self, n, deadline):
        # A payload is read into one block of its size, asked for once:
        # reading it in pieces and joining them needs that block and the
        # pieces at the same time, which a fragmented heap may not have.
        try:
            buf = bytearray(n)
        except MemoryError:
            # No block that large on the heap now: the payload is drained
            # and dropped, not the connection (None tells the device why).
            self._discard(n)
            return None
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.readinto(view[got:])
            if k is None:
                self._wait(_POLLIN, deadline)
            elif k == 0:
                raise OSError(errno.ECONNRESET)
            else:
                got += k
                self.rx_ticks = ticks_ms()
        return buf

    def skip_packet(self):
        # umqtt.simple returns the type of a packet it does not handle
        # (SUBACK, a stale PUBACK) without reading its body; drop the body so
        # the stream stays in step.
        n = read_length(self)
        if n:
            self._discard(n)
            self.discarded = 0

    def _discard(self, n):
        scratch = bytearray(min(n, 256))
        left = n
        deadline = self._deadline()
        while left:
            k = self.sock.readinto(scratch, min(left, len(scratch)))
            if k is None:
                self._wait(_POLLIN, deadline)
            elif k == 0:
                raise OSError(errno.ECONNRESET)
            else:
                left -= k
                self.rx_ticks = ticks_ms()
                # The bound is on silence, not on the whole payload: the
                # broker's largest (1 MB) takes longer than socket_timeout_ms
                # over a slow WiFi link, and must not cost the connection.
                deadline = self._deadline()
        self.discarded = n
        return b""

    def _deadline(self):
        # socket_timeout_ms from now, or the connect's deadline when sooner.
        deadline = ticks_add(ticks_ms(), self.timeout_ms)
        until = self.until
        if until is not None and ticks_diff(until, deadline) < 0:
            return until
        return deadline

    def _wait(self, event, deadline):
        if self.feed is not None:
            self.feed()
        left = ticks_diff(deadline, ticks_ms())
        if left <= 0:
            raise OSError(errno.ETIMEDOUT)
        self.poller.modify(self.sock, event)
        ready = self.poller.poll(left)
        self.poller.modify(self.sock, _POLLIN)
        if not ready:
            raise OSError(errno.ETIMEDOUT)

    def close(self):
        try:
            self.flush()
        except OSError:
            pass
        try:
            self.poller.unregister(self.sock)
        except (OSError, ValueError, KeyError):
            pass
        self.sock.close()


class SocketFactory:
    # Stands in for the `socket` module inside umqtt.simple, whose connect()
    # creates its own socket with no timeout and no TCP_NODELAY.
    def __init__(self, timeout_ms, max_read, nodelay, out):
        self.timeout_ms = timeout_ms
        self.max_read = max_read
        self.nodelay = nodelay
        self.out = out  # one socket at a time: they share it
        self.last = None
        self.until = None  # the connect's deadline, for the socket it makes (see Link._connect)
        self.feed = None

    def socket(self):
        self.last = PacketSocket(self.timeout_ms, self.max_read, self.nodelay, self.out, self.until, self.feed)
        return self.last

    def getaddrinfo(self, host, port):
        # MicroPython's getaddrinfo takes no timeout. A literal address is
        # parsed without asking DNS; a name's lookup is bounded only by the
        # IP stack's own DNS retries, so the watchdog is fed just before it
        # and the deadline checked just after.
        if self.feed is not None:
            self.feed()
        found = socket.getaddrinfo(host, port)
        if self.until is not None and ticks_diff(self.until, ticks_ms()) <= 0:
            raise OSError(errno.ETIMEDOUT)
        return found
