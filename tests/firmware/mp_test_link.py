# Link.send: batches go out as QoS 1 publishes without waiting for each
# PUBACK, one write each, sent from where they lie, numbered in sending
# order; PUBACKs are counted.
from fakes import packet_socket, publish_packet
from umqtt.simple import MQTTClient

TOPIC = b"fleet/dev-1/batch"


def link_over(sock):
    from link import Link

    settings = {"keepalive_s": 60, "batch_bytes": 1024, "socket_timeout_ms": 1000, "max_payload": 4096}
    link = Link("dev-1", settings, None, None, b"fleet/dev-1/status", None, print)
    link.client = MQTTClient("dev-1", "broker")
    link.client.sock = link.sock = sock
    link.connected = True
    return link


def send(link, payload, room=64):
    # As the device sends a batch: the payload where it lies in a buffer,
    # with room in front of it for the packet's header.
    packet = bytearray(room + len(payload))
    packet[room:] = payload
    return link.send(TOPIC, packet, room, len(packet))


def puback(pid):
    return b"\x40\x02" + pid.to_bytes(2, "big")


def test_send_does_not_wait_for_the_puback_and_numbers_its_packets():
    sock = packet_socket()  # the broker says nothing: a send that waited would read EOF
    link = link_over(sock)
    numbers = [send(link, b"batch %d" % n) for n in range(3)]
    assert numbers == [1, 2, 3], numbers
    assert link.connected and link.pubacked == 0
    expected = [publish_packet(TOPIC, b"batch %d" % n, 1, n + 1) for n in range(3)]
    assert sock.sock.writes == expected, sock.sock.writes


def test_a_publish_that_waits_for_its_puback_counts_the_sends_before_it_as_acknowledged():
    # umqtt.simple reads the PUBACKs of earlier sends while it waits for its
    # own, and they come in order: all of those are in.
    sock = packet_socket(puback(1) + puback(2) + puback(3))
    link = link_over(sock)
    send(link, b"a")
    send(link, b"b")
    assert link.publish(b"fleet/dev-1/status", b"x", True, 1)
    assert (link.sent, link.pubacked) == (2, 2)


def test_the_packet_id_wraps_as_publish_wraps_it():
    sock = packet_socket()
    link = link_over(sock)
    link.client.pid = 65535
    assert send(link, b"a") == 1
    assert sock.sock.writes == [publish_packet(TOPIC, b"a", 1, 1)], sock.sock.writes


def test_a_send_on_a_link_that_is_down_sends_nothing():
    sock = packet_socket()
    link = link_over(sock)
    link.connected = False
    assert send(link, b"a") == 0
    assert sock.sock.writes == []


def test_the_header_goes_in_front_of_the_payload_whatever_its_size():
    from link import HEADER_ROOM

    for size in (1, 127, 128, 5000, 20000):  # one, two and three bytes of remaining length
        sock = packet_socket()
        link = link_over(sock)
        payload = bytes(48 + i % 10 for i in range(size))
        assert send(link, payload, room=HEADER_ROOM + len(TOPIC)) == 1
        assert sock.sock.writes == [publish_packet(TOPIC, payload, 1, 1)], size


def test_a_payload_without_room_for_the_header_is_refused_before_anything_is_sent():
    from fakes import assert_raises

    sock = packet_socket()
    link = link_over(sock)
    assert_raises(ValueError, send, link, b"x", 10)
    assert sock.sock.writes == [] and link.connected


def test_a_broker_that_never_answers_the_connect_is_given_up_by_the_one_deadline():
    # A listener that takes the TCP connection (the backlog does) and never
    # sends CONNACK: the connect ends by connect_ms, not by the longer
    # per-step socket timeout, and the watchdog was fed on the way.
    import socket
    import time
    from link import Link

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # The unix port's sockets have no getsockname: bind the first free port
    # of a random run of candidates.
    import random
    port = None
    for _ in range(50):
        candidate = 20000 + random.getrandbits(14)
        try:
            listener.bind(socket.getaddrinfo("127.0.0.1", candidate)[0][-1])
        except OSError:
            continue
        port = candidate
        break
    assert port, "no free port for the silent listener"
    listener.listen(1)
    settings = {"keepalive_s": 60, "socket_timeout_ms": 5000, "max_payload": 4096, "mqtt_host": "127.0.0.1",
                "mqtt_port": port, "mqtt_user": None, "mqtt_password": None}
    link = Link("dev-1", settings, None, None, b"fleet/dev-1/status", None, print)
    link.connect_ms = 400
    fed = []
    link.feed = lambda: fed.append(1)
    link.subscribe(b"fleet/dev-1/cmd", 1)
    start = time.ticks_ms()
    try:
        link._connect()
    except OSError as e:
        elapsed = time.ticks_diff(time.ticks_ms(), start)
        assert "within the connect's 400 ms" in str(e), e
        assert elapsed < 2000, elapsed
        assert fed, "the watchdog was not fed during the connect"
        assert not link.connected
    else:
        raise AssertionError("connected to a broker that never answered")
    finally:
        listener.close()
        if link.sock is not None:
            link.sock.close()
