# Board profile: the simulator (MicroPython unix port on Linux).
#
# There is no radio, ADC or LED: WiFi is always joined, and the sensors give
# deterministic synthetic values per device so tests can predict them.
# The simulator passes per-process facts through the environment:
#   FLEET_SIM_UNIQUE_ID    hex string standing in for machine.unique_id()
#   FLEET_SIM_RESET_CAUSE  reset cause to report (default "power_on")
import math
import os
import time

# The simulator can have a board report another name (fleet-scale tests of
# queries by board); everything else stays the sim's.
NAME = os.getenv("FLEET_SIM_BOARD_NAME") or "sim"
# The unix port's socket module has no IPPROTO_TCP / TCP_NODELAY constants;
# these are Linux's values.
TCP_NODELAY = (6, 1)


def unique_id():
    hexid = os.getenv("FLEET_SIM_UNIQUE_ID")
    if hexid:
        return bytes(int(hexid[i : i + 2], 16) for i in range(0, len(hexid) - 1, 2))
    # Stable per flash folder, like a chip id is stable per board.
    import hashlib

    return hashlib.sha256(os.getcwd().encode()).digest()[:8]


_soft_reset = False


def reset_cause():
    if _soft_reset:
        return "soft_reset"
    return os.getenv("FLEET_SIM_RESET_CAUSE") or "power_on"


def safe_boot_requested():
    # No button on the simulator: the SAFE file is its way.
    return False


def watchdog(timeout_ms):
    # The unix port has no watchdog; the simulator notices a hung board.
    return None


def reset():
    # The unix port cannot reset itself: the firmware's main loop starts a
    # fresh Device in the same process, which is what a board does after
    # machine.reset() as far as the fleet can tell (new boot, new session).
    global _soft_reset
    _soft_reset = True


def _seed(text):
    h = 5381
    for c in text.encode():
        h = (h * 33 + c) & 0xFFFFFF
    return h


class Board:
    def __init__(self, device_id):
        self.device_id = device_id
        seed = _seed(device_id)
        # A base temperature between 20.0 and 49.9 C, fixed per device id.
        self.base_temp = 20 + (seed % 300) / 10
        self.rssi_dbm = -40 - seed % 40
        self.led_on = False

    # -- network -----------------------------------------------------------------
    def wifi_connect(self, ssid, password):
        pass

    def wifi_isconnected(self):
        return True

    def wifi_status(self):
        return "up"

    def wifi_joined(self):
        pass  # the host clock is already right

    def rssi(self):
        return self.rssi_dbm

    # -- sensors and outputs -------------------------------------------------------
    def temperature_c(self):
        # A slow +-1.5 C wave over 10 minutes around the device's base.
        t = time.time() % 600
        return round(self.base_temp + 1.5 * math.sin(t * 2 * math.pi / 600), 2)

    def display(self):
        # Drawn like the Pico W's SSD1306, saved as display.png in the flash folder.
        from pngscreen import PngScreen

        return PngScreen()

    def led(self, on):
        self.led_on = bool(on)

    # -- time ----------------------------------------------------------------------
    def time_s(self):
        # Unix time in seconds, or None before the clock is set. The host
        # clock is always set; milliseconds let the host measure latency.
        return time.time_ns() // 1000000 / 1000
