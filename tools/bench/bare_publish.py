# MicroPython benchmark: the heap a bare umqtt.simple loop needs, the
# baseline for the firmware's figure. A reading every 100 ms, built with
# json and sent QoS 1, for DURATION_MS.
#   micropython -X heapsize=N bare_publish.py HOST PORT DURATION_MS
import gc
import json
import sys
from time import sleep_ms, ticks_diff, ticks_ms

from umqtt import simple

host, port, duration = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
client = simple.MQTTClient("bench-bare", host, port, keepalive=60)
client.connect()
topic = b"fleet/bench-bare/telemetry"
started = ticks_ms()
sent = 0
while ticks_diff(ticks_ms(), started) < duration:
    gc.collect()
    reading = {"seq": sent, "ts": 1795680462 + sent, "temp_c": 23.31, "heap_free": gc.mem_free()}
    client.publish(topic, json.dumps(reading).encode(), False, 1)
    sent += 1
    sleep_ms(100)
client.disconnect()
print("RESULT %d" % sent)
