# MicroPython benchmark: the ceiling for forwarding, plain umqtt.simple QoS 0
# publishes of device-shaped readings, one per message, no log.
#   micropython qos0_ceiling.py HOST PORT COUNT
# TCP_NODELAY is set (the Linux values) so the ceiling is not Nagle's; a
# final PINGREQ/PINGRESP makes sure the broker has read everything.
import json
import sys
import time
from time import ticks_diff, ticks_ms

from umqtt import simple

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
client = simple.MQTTClient("bench-qos0", host, port, keepalive=60)
client.connect()
client.sock.setsockopt(6, 1, 1)
topic = b"bench/qos0"
bodies = [
    json.dumps({
        "temp_c": 23.31, "uptime_s": seq // 10, "heap_free": 61952, "backlog": seq, "dropped": 0,
        "rssi": -61, "seq": seq, "ts": time.time_ns() // 1000000 / 1000, "boot": 1,
    }).encode()
    for seq in range(min(count, 64))
]
started = ticks_ms()
for i in range(count):
    client.publish(topic, bodies[i % len(bodies)], False, 0)
client.ping()
client.wait_msg()  # QoS 0 has no replies: this is the PINGRESP, after every publish was read
elapsed = ticks_diff(ticks_ms(), started)
client.disconnect()
print("RESULT %d %d" % (count, elapsed))
