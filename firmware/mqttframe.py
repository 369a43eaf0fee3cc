# The MQTT 3.1.1 framing the firmware does itself, beside umqtt.simple's:
# a QoS 1 PUBLISH header written in front of a payload where it lies, a
# packet's remaining length read, packet ids wrapped. All of it here, so
# the link and the socket share one reading of the spec.
from micropython import const

PUBLISH = const(0x30)  # the packet type, in the first byte's high nibble
PUBACK = const(0x40)
_PUBLISH_QOS1 = const(0x32)
# What a QoS 1 PUBLISH needs in front of its payload besides the topic: the
# fixed header (a byte and up to four of remaining length), the topic's
# length and the packet id.
HEADER_ROOM = const(9)


def next_pid(client):
    # umqtt.simple counts its packet id up and never wraps it; MQTT's is
    # 16 bits and never 0 (2.3.1). Leaves client.pid where publish() adds 1.
    if client.pid >= 65535:
        client.pid = 0


def put_publish_header(packet, start, end, topic, pid):
    # A QoS 1 PUBLISH of packet[start:end] on `topic`, its header written
    # backwards from the payload into packet[:start] (which needs
    # HEADER_ROOM and the topic). Returns where the packet begins.
    at = start - 2
    packet[at] = pid >> 8
    packet[at + 1] = pid & 0xFF
    at -= len(topic)
    packet[at:at + len(topic)] = topic
    at -= 2
    packet[at] = len(topic) >> 8
    packet[at + 1] = len(topic) & 0xFF
    size = end - at
    length = 1
    while size >> (7 * length):
        length += 1
    at -= length + 1
    packet[at] = _PUBLISH_QOS1
    for i in range(length):
        packet[at + 1 + i] = (size >> (7 * i)) & 0x7F | (0x80 if i < length - 1 else 0)
    return at


def read_length(sock):
    # A packet's remaining length (2.2.3), read a byte at a time.
    n = 0
    shift = 0
    while True:
        b = sock.read(1)[0]
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n
        shift += 7
