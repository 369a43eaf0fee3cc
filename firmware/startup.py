# From power-up to a running Device, and again after every soft reboot.
# What a boot reads (settings.json, protocol.json, the MicroPython version
# check) is settings.py's: imported for the boot and let go of before the
# Device asks for its buffers, from .mpy files too, so none of its code
# stays on the heap while the board runs.
import asyncio
import gc
import sys
from time import sleep_ms

import board as profile
from device import Device, log

import coldcode


def _device_settings():
    import settings

    try:
        return settings.for_device(log)
    finally:
        sys.modules.pop("settings", None)


def _new_device():
    # In a function of its own: once it returns, nothing of protocol.json
    # is reachable from a frame (the GC is conservative: a stale slot will
    # do) when the Device asks for its buffers. On a small heap the two did
    # not fit at once, and the board could not boot.
    chosen, protocol = _device_settings()
    gc.collect()
    device = Device(chosen, protocol)
    coldcode.let_go()  # what only the boot needed
    return device


def _boot():
    # One boot, from building the Device to its stop; True when it asked
    # for a reboot. A function of its own for the heap's sake: the GC scans
    # the whole frame of every function still running, stale slots
    # included, and left in main() the stopped device's temporaries kept
    # its link, log and tasks alive into the next boot, which then failed
    # for want of them. Once this returns, its frame is no longer scanned.
    device = _new_device()
    try:
        gc.collect()
        asyncio.run(device.run())
        return device.reboot_requested
    finally:
        device.release()


def main():
    while True:
        gc.collect()
        try:
            if _boot():
                log("rebooting")
                profile.reset()  # real boards do not come back from this
        except KeyboardInterrupt:
            raise
        except Exception as e:
            # Last line of defence: say what happened and start over rather
            # than sit dead. (Real boards also have the watchdog.)
            log("firmware error, restarting in 5 s:")
            sys.print_exception(e)
            sleep_ms(5000)
        asyncio.new_event_loop()
