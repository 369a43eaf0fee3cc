# What every real board with a WiFi station shares: joining the network,
# signal strength, a clock set over NTP, the LED on one pin, the chip's id,
# its reset cause and reset. Board profiles subclass NetworkedBoard, import
# the functions, and add their pins and sensors; the sim profile needs none
# of it.
import time

import machine
import network

# Before NTP the RTC counts from its reset value; anything earlier than this
# (2023-11-14, Unix time) is taken as "not set" and timestamps are null.
_UNSYNCED_BEFORE = 1700000000


# Seconds from 1970 to 2000: ports whose time.time() counts from 2000 (the
# ESP32 port did until recently) get this added, so timestamps and command
# expiry are Unix time on every board.
_EPOCH_2000 = 946684800


def unique_id():
    return machine.unique_id()


def reset_cause_of(causes):
    # The port's reset cause named by the profile's table, or "other".
    return causes.get(machine.reset_cause(), "other")


def reset():
    machine.reset()


class NetworkedBoard:
    def __init__(self, device_id, led_pin):
        self.device_id = device_id
        self.led_pin = machine.Pin(led_pin, machine.Pin.OUT)
        self.wlan = network.WLAN(network.STA_IF)
        self.epoch_offset = _EPOCH_2000 if time.gmtime(0)[0] == 2000 else 0

    def led(self, on):
        self.led_pin.value(1 if on else 0)

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
            pass  # timestamps stay null until a later sync succeeds

    def rssi(self):
        try:
            return self.wlan.status("rssi")
        except Exception:
            return None

    def time_s(self):
        t = time.time() + self.epoch_offset
        return t if t >= _UNSYNCED_BEFORE else None


def ssd1306_on_i2c(bus, sda, scl, address=0x3C):
    # The SSD1306 128x64 OLED if one answers on this I2C bus, else None.
    # Needs micropython-lib's driver: mpremote mip install ssd1306.
    try:
        from machine import I2C, Pin

        i2c = I2C(bus, sda=Pin(sda), scl=Pin(scl), freq=400000)
        if address not in i2c.scan():
            return None
        # A mip dependency of the board profiles, not fetched into build/ for
        # the type check; ImportError is handled below.
        import ssd1306  # pyright: ignore[reportMissingImports]

        return ssd1306.SSD1306_I2C(128, 64, i2c, address)
    except (ImportError, OSError, ValueError) as e:
        print("display: none (%r)" % (e,))
        return None
