# Board profile: Raspberry Pi Pico W (RP2040 + CYW43439 WiFi).
import machine
import network
import time

NAME = "pico_w"
# modlwip has no IPPROTO_TCP/TCP_NODELAY constants on older firmware; lwIP's
# values are 6 and 1. setsockopt failing is handled by the link (single
# writes per packet keep Nagle's algorithm from stalling us anyway).
TCP_NODELAY = (6, 1)
HAS_DISPLAY = False  # the SSD1306 wiring arrives with the display work
LED_PIN = "LED"  # on the CYW43 chip, not a GPIO
TEMP_ADC = 4  # RP2040 internal temperature sensor
# The RP2040 datasheet, section 4.9.5: T = 27 - (V - 0.706) / 0.001721
_ADC_VOLTS = 3.3 / 65535

_RESET_CAUSES = {
    getattr(machine, "PWRON_RESET", 1): "power_on",
    getattr(machine, "WDT_RESET", 3): "watchdog",
}

# Linux's and MicroPython's epoch is 1970 on rp2 since v1.22.
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
        self.adc = machine.ADC(TEMP_ADC)

    def wifi_connect(self, ssid, password):
        self.wlan.active(True)
        # The CYW43 power-saving mode drops packets and stalls MQTT on the
        # Pico W; 0xa11140 is the documented "performance" setting.
        self.wlan.config(pm=0xA11140)
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
            pass  # timestamps stay None until a later sync succeeds

    def rssi(self):
        try:
            return self.wlan.status("rssi")
        except Exception:
            return None

    def temperature_c(self):
        volts = self.adc.read_u16() * _ADC_VOLTS
        return round(27 - (volts - 0.706) / 0.001721, 2)

    def led(self, on):
        self.led_pin.value(1 if on else 0)

    def time_s(self):
        t = time.time()
        return t if t >= _UNSYNCED_BEFORE else None
