# Entry point on every board: MicroPython runs main.py after boot.
import device

device.main()
