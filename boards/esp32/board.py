# Board profile: ESP32 (generic devkit, WROOM module, no PSRAM).
import esp32
import machine

from netboard import NetworkedBoard, reset, reset_cause_of, ssd1306_on_i2c, unique_id

NAME = "esp32"
TCP_NODELAY = (6, 1)  # lwIP's IPPROTO_TCP and TCP_NODELAY
LED_PIN = 2  # the blue LED on most ESP32 devkits

_RESET_CAUSES = {
    machine.PWRON_RESET: "power_on",
    machine.HARD_RESET: "hard_reset",
    machine.WDT_RESET: "watchdog",
    machine.DEEPSLEEP_RESET: "deep_sleep",
    machine.SOFT_RESET: "soft_reset",
}


def reset_cause():
    return reset_cause_of(_RESET_CAUSES)


def safe_boot_requested():
    # The BOOT button (GPIO 0, pulled up, low when held) at power-up.
    return machine.Pin(0, machine.Pin.IN, machine.Pin.PULL_UP).value() == 0


def watchdog(timeout_ms):
    return machine.WDT(timeout=timeout_ms)


class Board(NetworkedBoard):
    def __init__(self, device_id):
        super().__init__(device_id, LED_PIN)

    def temperature_c(self):
        # ESP32-S2/S3/C3 have mcu_temperature() in C; the original ESP32 only
        # raw_temperature() in Fahrenheit.
        if hasattr(esp32, "mcu_temperature"):
            # Not in the generic ESP32 stubs, rightly; the type checker does
            # not narrow a module by hasattr().
            return esp32.mcu_temperature()  # pyright: ignore[reportAttributeAccessIssue]
        return round((esp32.raw_temperature() - 32) / 1.8, 2)

    def display(self):
        # SSD1306 128x64 on I2C0: SDA GPIO21, SCL GPIO22, the usual ESP32 wiring.
        return ssd1306_on_i2c(0, 21, 22)
