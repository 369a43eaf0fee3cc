# MicroPython benchmark helper: the heap a Device holds, one script for the
# unix port (64-bit) and the webassembly port (32-bit, tools/js/heap32.mjs).
#   micropython heap_device.py    (in an empty folder standing in for flash;
#                                  the sim profile, the firmware and its libraries on the path)
# Builds a Device on the sim profile through its public constructor, as
# tests/firmware do, then runs it a little: records readings, flushes them
# to the log, lays out a batch, answers `info`. Prints one line, HEAP {json}:
#   live_<step>  gc.mem_alloc() after the step and a collection, less the
#                baseline (the VM before the firmware was imported)
#   peak         the largest gc.mem_alloc() before a step's collection,
#                less the baseline: what the step's garbage adds (the VM
#                must be given a heap the steps fill without collecting)
# The steps are STEPS; the webassembly port collects only at its top level,
# between two runPython calls, so there the runner calls step(i), then
# gc.collect(), then measure(i), each on its own, and report() at the end.
import gc
import json
import sys

STEPS = ("imported", "constructed", "running")
figures = {}
_device = None


def _import():
    global settings, Device
    import settings
    import startup  # as main.py does: the boot's code is on a board's heap too
    from device import Device


def _construct():
    global _device
    protocol = settings.load_protocol()
    chosen = settings.validate({"wifi_ssid": "lab", "mqtt_host": "127.0.0.1", "device_id": "heap-1"},
                               protocol["settings"])
    _device = Device(chosen, protocol)


def _run():
    for i in range(8):
        assert _device.record({"temp_c": 20 + i, "uptime_s": i})
    _device.backlog.flush()
    count, size, _ = _device.backlog.next_batch(4096)
    _device.forwarder.lay_out(size, -1, 0)
    assert count == 8, count
    assert _device.info()
    figures["packet_buffer"] = len(_device.packet)


_ACTIONS = (_import, _construct, _run)


def step(i):
    _ACTIONS[i]()
    used = gc.mem_alloc()
    if used > figures["peak"]:
        figures["peak"] = used


def measure(i):
    figures["live_" + STEPS[i]] = gc.mem_alloc()


def report():
    base = figures["baseline"]
    for key in figures:
        if key.startswith("live_") or key == "peak":
            figures[key] -= base
    figures["heap_total"] = gc.mem_alloc() + gc.mem_free()
    figures["version"] = "%d.%d.%d" % sys.implementation.version[:3]
    print("HEAP " + json.dumps(figures))


gc.collect()
figures["baseline"] = figures["peak"] = gc.mem_alloc()
if not globals().get("EXTERNAL_GC"):
    for i in range(len(STEPS)):
        step(i)
        gc.collect()
        measure(i)
    report()
