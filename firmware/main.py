# Entry point on every board: MicroPython runs main.py after boot.
#
# Safe boot: a file named SAFE in the flash's top folder, or the board's
# button held at power-up (BOOTSEL on the Pico W, BOOT on the ESP32), skips
# the firmware and leaves the REPL free, so a bad configuration can never
# lock anyone out. Remove the file with `mpremote rm :SAFE`.
import os

import board

if "SAFE" in os.listdir() or board.safe_boot_requested():
    print("safe boot: firmware not started (remove SAFE or release the button, then reset)")
else:
    import startup

    startup.main()
