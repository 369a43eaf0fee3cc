# Board profile: Raspberry Pi Pico W (RP2040 + CYW43439 WiFi).
import machine

from netboard import NetworkedBoard, reset, reset_cause_of, ssd1306_on_i2c, unique_id

NAME = "pico_w"
# lwIP's IPPROTO_TCP and TCP_NODELAY. If the port refuses the option, the
# link carries on: one write per packet keeps Nagle from stalling us anyway.
TCP_NODELAY = (6, 1)
LED_PIN = "LED"  # on the CYW43 chip, not a GPIO
TEMP_ADC = 4  # RP2040 internal temperature sensor
# RP2040 datasheet, section 4.9.5: T = 27 - (V - 0.706) / 0.001721
_ADC_VOLTS = 3.3 / 65535

_RESET_CAUSES = {
    getattr(machine, "PWRON_RESET", 1): "power_on",
    getattr(machine, "WDT_RESET", 3): "watchdog",
}


def reset_cause():
    return reset_cause_of(_RESET_CAUSES)


def safe_boot_requested():
    # BOOTSEL held at power-up.
    try:
        import rp2

        return bool(rp2.bootsel_button())
    except (ImportError, AttributeError):
        return False


def watchdog(timeout_ms):
    # The RP2040 watchdog caps its timeout at about 8.3 s.
    return machine.WDT(timeout=min(timeout_ms, 8300))


class Board(NetworkedBoard):
    def __init__(self, device_id):
        super().__init__(device_id, LED_PIN)
        self.adc = machine.ADC(TEMP_ADC)

    def wifi_connect(self, ssid, password):
        self.wlan.active(True)
        # The CYW43 power-saving mode drops packets and stalls MQTT on the
        # Pico W; 0xa11140 is the documented "performance" setting.
        self.wlan.config(pm=0xA11140)
        self.wlan.connect(ssid, password)

    def temperature_c(self):
        volts = self.adc.read_u16() * _ADC_VOLTS
        return round(27 - (volts - 0.706) / 0.001721, 2)

    def display(self):
        # SSD1306 128x64 on I2C0: SDA GP4, SCL GP5 (3V3 and GND beside them).
        return ssd1306_on_i2c(0, 4, 5)
