"""The 32-bit heap figure (bench/heap32.py): one script measures a running
Device on MicroPython's webassembly port (32-bit, from npm, run by node) and
on the unix port (64-bit); both figures are real and the 32-bit one is the
smaller."""
from __future__ import annotations

import pytest

from bench.heap32 import WASM_PACKAGE, heap_figures


@pytest.mark.skipif(not WASM_PACKAGE.exists(),
                    reason="tools/js/node_modules missing: `make setup` runs npm ci there")
def test_a_device_takes_less_heap_on_the_32_bit_vm_than_on_the_64_bit_one() -> None:
    figures = heap_figures()
    small, large = figures["32-bit"], figures["64-bit"]
    assert 0 < small < large, figures
    # A Device with its 4 KB packet buffer, the firmware's bytecode and the
    # sim profile: tens of kilobytes, not a few bytes or megabytes.
    assert 20_000 < small < 200_000 and 20_000 < large < 400_000, figures
    # Each step adds to the last, and both VMs ran the same Device.
    for detail in (figures["32-bit detail"], figures["64-bit detail"]):
        assert 0 < detail["live_imported"] < detail["live_constructed"] <= detail["peak"], detail
    assert figures["32-bit detail"]["packet_buffer"] == figures["64-bit detail"]["packet_buffer"], figures
