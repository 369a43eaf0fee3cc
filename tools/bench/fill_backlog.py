# MicroPython benchmark helper: a board's flash with a backlog of readings.
#   micropython fill_backlog.py COUNT        (run in the board's flash folder)
# Writes COUNT device-shaped readings into log/ the way a board does while
# offline (the flush policy's batched writes), and state.json so that the
# board's next reading follows them. Then, in a scratch folder, measures the
# flash bytes of the whole cycle: recorded offline, forwarded, acknowledged.
import json
import os
import sys
import time

from backlog import BacklogLog
from state import DeviceState

count = int(sys.argv[1])


def reading(seq):
    return json.dumps({
        "temp_c": 23.31, "uptime_s": seq // 10, "heap_free": 61952, "backlog": seq, "dropped": 0,
        "rssi": -61, "seq": seq, "ts": time.time_ns() // 1000000 / 1000, "boot": 1,
    }).encode()


def fill(folder, n, budget):
    log = BacklogLog(folder, budget, budget // 16, 16, 1000)
    size = 0
    for seq in range(n):
        body = reading(seq)
        size += len(body)
        log.append(body)
    log.flush()
    return log, size


log, size = fill("log", count, 4 * 1024 * 1024)
state = DeviceState()
state.seq = count  # the next live reading follows the backlog
state.boot()
state.next_seq()

# The whole cycle in a scratch folder: offline writes, then forwarding in
# 2 KB batches with the cursor replaced after each acknowledgement.
cycle, _ = fill("bench-cycle", 2000, 1024 * 1024)
written_offline = cycle.flash_bytes
while True:
    taken, _, token = cycle.next_batch(2048)
    if not taken:
        break
    cycle.ack(token)
for name in os.listdir("bench-cycle"):
    os.remove("bench-cycle/" + name)
os.rmdir("bench-cycle")
state_bytes = len('{"boots": 1, "seq_next": 12345}') / 64  # one reservation per 64 readings
print("RESULT %d %d %d %d %d %.2f" % (count, size, log.flash_bytes, written_offline, cycle.flash_bytes, state_bytes))
