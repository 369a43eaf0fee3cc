"""Simulated boards: the real firmware in the MicroPython unix port, with faults, a live table and their flash logs."""
