# Board profile: ESP32 (generic devkit, WROOM module, no PSRAM).
import esp32
import machine
import network
import time

NAME = "esp32"
TCP_NODELAY = (6, 1)  # lwIP's IPPROTO_TCP and TCP_NODELAY
HAS_DISPLAY = False
LED_PIN = 2  # the blue LED on most ESP32 devkits

_RESET_CAUSES = {
    machine.PWRON_RESET: "power_on",
    machine.HARD_RESET: "hard_reset",
    machine.WDT_RESET: "watchdog",
    machine.DEEPSLEEP_RESET: "deep_sleep",
    machine.SOFT_RESET: "soft_reset",
}
_UNSYNCED_BEFORE = 1700000000


def unique_id():
    return machine.unique_id()


def reset_cause():
    return _RESET_CAUSES.get(machine.reset_cause(), "other")


class Board:
    def __init__(self, device_id):
        self.device_id = device_id
        self.wlan = network.WLAN(network.STA_IF)
        self.led_pin = machine.Pin(LED_PIN, machine.Pin.OUT)

    def wifi_connect(self, ssid, password):
        self.wlan.active(True)
        self.wlan.connect(ssid, password)

    def wifi_isconnected(self):
        return self.wlan.isconnected()

    def wifi_status(self):
        return "status %d" % self.wlan.status()

    def wifi_joined(self):
        try:
            import ntptime

            ntptime.settime()
        except Exception:
            pass

    def rssi(self):
        try:
            return self.wlan.status("rssi")
        except Exception:
            return None

    def temperature_c(self):
        # ESP32-S2/S3/C3 have mcu_temperature() in C; the original ESP32 only
        # raw_temperature() in Fahrenheit.
        if hasattr(esp32, "mcu_temperature"):
            return esp32.mcu_temperature()
        return round((esp32.raw_temperature() - 32) / 1.8, 2)

    def led(self, on):
        self.led_pin.value(1 if on else 0)

    def time_s(self):
        t = time.time()
        # Older esp32 firmware counts from 2000; treat either as unsynced early.
        return t if t >= _UNSYNCED_BEFORE else None
