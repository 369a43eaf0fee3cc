# Test doubles for the firmware's outside world, in the micropython-lib
# umqtt tests' manner: a socket whose reads come from given bytes and whose
# writes are recorded one by one.
import io


class ScriptedSocket:
    def __init__(self, incoming=b""):
        self.rx = io.BytesIO(incoming)
        self.writes = []

    def write(self, buf, n=-1):
        data = bytes(buf if n < 0 else memoryview(buf)[:n])
        self.writes.append(data)
        return len(data)

    def read(self, n):
        return self.rx.read(n)  # b"" at the end, like a closed peer

    def readinto(self, buf, n):
        data = self.rx.read(n)
        buf[: len(data)] = data
        return len(data)

    def close(self):
        pass


def packet_socket(incoming=b"", max_read=4096, timeout_ms=1000):
    from mqttsocket import PacketSocket

    sock = PacketSocket(timeout_ms, max_read)
    sock.sock.close()
    sock.sock = ScriptedSocket(incoming)
    return sock


def publish_packet(topic, payload, qos=0, pid=1):
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += pid.to_bytes(2, "big")
    body += payload
    size = len(body)
    header = bytearray([0x30 | qos << 1])
    while True:
        byte = size & 0x7F
        size >>= 7
        header.append(byte | (0x80 if size else 0))
        if not size:
            break
    return bytes(header) + body


def assert_raises(error, fn, *args):
    try:
        fn(*args)
    except error as e:
        return e
    raise AssertionError("%s not raised" % error.__name__)
