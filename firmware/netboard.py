# What every real board with a WiFi station shares: joining the network,
# signal strength, and a clock set over NTP. Board profiles subclass this
# and add their pins and sensors; the sim profile needs none of it.
import time

import network

# Before NTP the RTC counts from its reset value; anything earlier than this
# (2023-11-14) is taken as "not set" and timestamps are reported as null.
_UNSYNCED_BEFORE = 1700000000


class NetworkedBoard:
    def __init__(self):
        self.wlan = network.WLAN(network.STA_IF)

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
        t = time.time()
        return t if t >= _UNSYNCED_BEFORE else None
