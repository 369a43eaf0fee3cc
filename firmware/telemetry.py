# Periodic readings: the board's sensors plus the device's own health.
import asyncio
import gc
from time import ticks_add, ticks_diff, ticks_ms


class Telemetry:
    # `record(reading)` is the device's one door into the flash log.
    def __init__(self, board, backlog, started, record, interval_ms):
        self.board = board
        self.backlog = backlog
        self.started = started  # ticks_ms() at boot
        self.record = record
        self.interval_ms = interval_ms

    def sample(self):
        board = self.board
        gc.collect()  # so heap_free is what is really free, comparable over time
        reading = {
            "temp_c": board.temperature_c(),
            "uptime_s": ticks_diff(ticks_ms(), self.started) // 1000,
            "heap_free": gc.mem_free(),
            "backlog": self.backlog.backlog(),  # recorded, not yet acknowledged
            "dropped": self.backlog.dropped,  # lost to a full flash budget, ever
        }
        rssi = board.rssi()
        if rssi is not None:
            reading["rssi"] = rssi
        return reading

    async def run(self):
        # Fixed-rate schedule: a slow publish does not push later readings back.
        due = ticks_ms()
        while True:
            self.record(self.sample())
            due = ticks_add(due, self.interval_ms)
            wait = ticks_diff(due, ticks_ms())
            if wait < 0:  # fell behind (a long reconnect): start afresh
                due = ticks_ms()
                wait = 0
            await asyncio.sleep_ms(wait)
