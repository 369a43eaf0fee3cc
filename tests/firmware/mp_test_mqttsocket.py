# PacketSocket under umqtt.simple: exact bytes, one write per packet,
# bounded reads, oversize payloads dropped without losing the stream.
import errno
import socket
from time import ticks_diff, ticks_ms

from fakes import ScriptedSocket, assert_raises, packet_socket, publish_packet
from umqtt.simple import MQTTClient


def client_over(sock):
    client = MQTTClient("dev-1", "broker")
    client.sock = sock
    return client


def test_qos0_publish_is_a_single_write_with_exact_bytes():
    sock = packet_socket()
    client_over(sock).publish(b"t/x", b"hi")
    sock.flush()
    assert sock.sock.writes == [b"\x30\x07\x00\x03t/xhi"], sock.sock.writes


def test_qos1_publish_is_sent_whole_before_waiting_for_puback():
    sock = packet_socket(b"\x40\x02\x00\x01")
    client_over(sock).publish(b"t/x", b"hi", False, 1)
    assert sock.sock.writes == [b"\x32\x09\x00\x03t/x\x00\x01hi"], sock.sock.writes


def test_a_packet_that_does_not_fit_grows_the_buffer_in_512_byte_steps():
    sock = packet_socket(b"\x40\x02\x00\x01")
    assert len(sock.out) == 128
    payload = b"r" * 300
    client_over(sock).publish(b"t/x", payload, False, 1)
    assert sock.sock.writes == [publish_packet(b"t/x", payload, 1)], sock.sock.writes
    assert len(sock.out) == 512


def test_a_packet_sent_where_it_lies_goes_after_what_was_gathered():
    sock = packet_socket()
    client_over(sock).ping()  # gathered, not yet sent
    sock.send(memoryview(b"\x30\x05\x00\x01tab")[:7])
    assert sock.sock.writes == [b"\xc0\x00", b"\x30\x05\x00\x01tab"], sock.sock.writes
    assert sock.n == 0


def test_pingreq_is_two_bytes_and_counts_as_one_write():
    sock = packet_socket()
    client_over(sock).ping()
    sock.flush()
    assert sock.sock.writes == [b"\xc0\x00"]


def test_oversize_payload_is_discarded_and_the_next_packet_still_parses():
    got = []
    big = publish_packet(b"a/b", b"x" * 300)
    small = publish_packet(b"a/c", b"ok")
    sock = packet_socket(big + small, max_read=100)
    client = client_over(sock)
    client.set_callback(lambda t, m: got.append((t, m, sock.discarded)))
    client.wait_msg()
    client.wait_msg()
    assert got[0] == (b"a/b", b"", 300), got
    assert got[1][:2] == (b"a/c", b"ok"), got


def test_an_empty_payload_is_delivered_and_the_next_packet_still_parses():
    # mosquitto_pub -n, or -r -n clearing a retained message: umqtt.simple
    # then reads the payload as read(0).
    got = []
    sock = packet_socket(publish_packet(b"a/b", b"") + publish_packet(b"a/c", b"ok"))
    client = client_over(sock)
    client.set_callback(lambda t, m: got.append((t, m)))
    client.wait_msg()
    client.wait_msg()
    assert got == [(b"a/b", b""), (b"a/c", b"ok")], got


def test_an_empty_qos1_payload_is_acknowledged_in_one_write():
    got = []
    sock = packet_socket(publish_packet(b"cmd", b"", qos=1, pid=9))
    client = client_over(sock)
    client.set_callback(lambda t, m: got.append(m))
    client.wait_msg()
    sock.flush()
    assert got == [b""] and sock.sock.writes == [b"\x40\x02\x00\x09"], (got, sock.sock.writes)


def test_a_zero_length_read_returns_at_once_without_touching_a_live_socket():
    from mqttsocket import PacketSocket

    listener, port = _listen_on_free_port()
    sock = PacketSocket(300, 4096, (6, 1))
    sock.connect(socket.getaddrinfo("127.0.0.1", port)[0][-1])
    peer, _ = listener.accept()
    peer.write(publish_packet(b"t", b"v"))
    started = ticks_ms()
    assert sock.read(0) == b""
    assert ticks_diff(ticks_ms(), started) < 100
    assert sock.read(1) == b"\x30"  # the stream is still in step
    sock.close()
    peer.close()
    listener.close()


class _SlowPoller:
    # Stands in for select.poll: each wait takes `step_ms` (or what is
    # left of the caller's deadline, if less), then says "readable".
    def __init__(self, step_ms):
        self.step_ms = step_ms
        self.waits = []

    def modify(self, sock, event):
        pass

    def poll(self, timeout_ms):
        from time import sleep_ms

        self.waits.append(timeout_ms)
        sleep_ms(min(timeout_ms, self.step_ms))
        return [(None, 1)]


class _TrickleSocket(ScriptedSocket):
    # A peer that sends a chunk, then makes the reader wait, then the next.
    def __init__(self, incoming, chunk):
        super().__init__(incoming)
        self.chunk = chunk
        self.ready = False

    def readinto(self, buf, n):
        if not self.ready:
            self.ready = True
            return None
        self.ready = False
        return super().readinto(buf, min(n, self.chunk))


def test_an_oversize_payload_that_trickles_in_is_discarded_while_data_keeps_coming():
    # The bound is on silence: a 1 MB payload over slow WiFi takes longer
    # than socket_timeout_ms in all, and must not cost the connection.
    got = []
    sock = packet_socket(max_read=100, timeout_ms=200)
    sock.sock = _TrickleSocket(publish_packet(b"a/b", b"x" * 1000), 250)
    sock.poller = _SlowPoller(120)
    client = client_over(sock)
    client.set_callback(lambda t, m: got.append((t, m, sock.discarded)))
    client.wait_msg()
    assert got == [(b"a/b", b"", 1000)], got
    assert len(sock.poller.waits) >= 4 and min(sock.poller.waits) > 120, sock.poller.waits


def test_qos1_incoming_message_is_acknowledged_in_one_write():
    sock = packet_socket(publish_packet(b"cmd", b"go", qos=1, pid=7))
    client = client_over(sock)
    client.set_callback(lambda t, m: None)
    client.wait_msg()
    sock.flush()
    assert sock.sock.writes == [b"\x40\x02\x00\x07"], sock.sock.writes


def test_unhandled_packet_body_is_skipped_so_the_stream_stays_in_step():
    got = []
    sock = packet_socket(b"\x90\x03\x00\x01\x00" + publish_packet(b"t", b"v"))
    client = client_over(sock)
    client.set_callback(lambda t, m: got.append(m))
    op = client.wait_msg()
    assert op == 0x90
    sock.skip_packet()
    client.wait_msg()
    assert got == [b"v"]


def test_connection_closed_mid_packet_is_an_oserror():
    sock = packet_socket(publish_packet(b"topic", b"payload")[:6])
    client = client_over(sock)
    client.set_callback(lambda t, m: None)
    assert_raises(OSError, client.wait_msg)


def test_first_byte_handed_over_by_the_link_is_read_first():
    got = []
    packet = publish_packet(b"t", b"v")
    sock = packet_socket(packet[1:])
    sock.first = packet[:1]
    client = client_over(sock)
    client.set_callback(lambda t, m: got.append(m))
    client.wait_msg()
    assert got == [b"v"]


def test_read_from_a_silent_peer_times_out_within_the_deadline():
    from mqttsocket import PacketSocket

    listener, port = _listen_on_free_port()
    sock = PacketSocket(300, 4096, (6, 1))
    sock.connect(socket.getaddrinfo("127.0.0.1", port)[0][-1])
    peer, _ = listener.accept()
    started = ticks_ms()
    error = assert_raises(OSError, sock.read, 1)
    elapsed = ticks_diff(ticks_ms(), started)
    assert error.errno == errno.ETIMEDOUT, error
    assert 250 <= elapsed < 1500, elapsed
    sock.close()
    peer.close()
    listener.close()


def _listen_on_free_port():
    # The unix port has no getsockname(), so pick the port ourselves.
    import random

    while True:
        port = random.randint(20000, 60000)
        listener = socket.socket()
        try:
            listener.bind(socket.getaddrinfo("127.0.0.1", port)[0][-1])
            listener.listen(1)
            return listener, port
        except OSError:
            listener.close()


def test_the_gather_buffer_grows_to_fit_not_to_double():
    sock = packet_socket()
    sock.write(b"x" * 4200)
    assert len(sock.out) == 4608  # 4200 rounded up to 512, not 8192
    sock.flush()
    sock.write(b"y" * 100)
    assert len(sock.out) == 4608 and sock.n == 100  # reused, not shrunk


def test_settimeout_from_a_newer_umqtt_keeps_a_bound_on_every_operation():
    # umqtt.simple >= 1.4 (frozen into the ESP32 port) calls
    # sock.settimeout(timeout) before connect, with None by default.
    sock = packet_socket(timeout_ms=1500)
    sock.settimeout(None)
    assert sock.timeout_ms == 1500
    sock.settimeout(2.5)
    assert sock.timeout_ms == 2500
