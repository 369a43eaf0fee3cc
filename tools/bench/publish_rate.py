# MicroPython benchmark: QoS 1 publishes per second through umqtt.simple.
#   micropython publish_rate.py MODE HOST PORT COUNT
# MODE: plain      umqtt.simple's own socket (Nagle on, as on every port)
#       nodelay    umqtt.simple's own socket, TCP_NODELAY set after connect
#       packet     the firmware's PacketSocket: one write per packet, TCP_NODELAY
#       packet-nagle  PacketSocket with Nagle left on (a port without TCP_NODELAY)
import sys
from time import ticks_diff, ticks_ms

from mqttsocket import SocketFactory
from umqtt import simple

mode, host, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode.startswith("packet"):
    simple.socket = SocketFactory(5000, 4096, None if mode == "packet-nagle" else (6, 1), bytearray(512))
client = simple.MQTTClient("bench-" + mode, host, port, keepalive=60)
client.connect()
if mode == "nodelay":
    client.sock.setsockopt(6, 1, 1)
payload = b'{"seq": 123456, "ts": 1795680462, "temp_c": 23.31, "heap_free": 81152}'
topic = b"fleet/bench/telemetry"
started = ticks_ms()
for i in range(count):
    client.publish(topic, payload, False, 1)
elapsed = ticks_diff(ticks_ms(), started)
client.disconnect()
print("RESULT %s %d %d" % (mode, count, elapsed))
