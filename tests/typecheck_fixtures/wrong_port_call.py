# Deliberately wrong for the Pico W (rp2) port: tests/test_firmware_types.py
# checks that tools/typecheck_firmware.py rejects every line marked
# "expect: NAME", naming NAME, and nothing else. Never shipped to a board.
import machine
import network

import esp32  # expect: esp32 (ESP32 port only)
import threading  # expect: threading (CPython, not MicroPython)
from machine import Timer, NoSuchClass  # expect: NoSuchClass


def unannotated(pin, level):
    # Missing annotations are fine: only the port's API is checked.
    pin.value(level)
    return Timer


def misuse():
    led = machine.Pin("LED", machine.Pin.OUT)
    led.value(1)
    led.no_such_method()  # expect: no_such_method
    print(machine.reset_cause() == machine.NO_SUCH_RESET)  # expect: NO_SUCH_RESET
    machine.WDT(timeout=8300, bogus_argument=1)  # expect: bogus_argument
    network.WLAN(network.STA_IF).active(True, False)  # expect: active
    unannotated(led, 1)
