"""The firmware as a ROM image run in place (fleet.romfs): built with
`mpremote romfs build`, mounted from memory outside the VM's heap."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fleet.paths import micropython_executable
from fleet.boards.romfs import ROM_MOUNT, ROM_PATH, build_image, main, vm_command

# Heap taken by importing the firmware, measured inside the VM.
MEASURE_IMPORT = """
import gc
gc.collect()
before = gc.mem_alloc()
import device
gc.collect()
print(gc.mem_alloc() - before, device.__file__)
"""


def _import_cost(command: list[str], micropypath: str, cwd: Path) -> tuple[int, str]:
    env = dict(os.environ, MICROPYPATH=micropypath, FLEET_SIM_UNIQUE_ID="romfs-test")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    cost, where = result.stdout.split()
    return int(cost), where


def test_the_firmware_run_from_a_rom_image_takes_far_less_heap_than_its_mpy_files(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    image = build_image("sim", stage, tmp_path / "firmware.romfs")
    from_files, file_path = _import_cost(
        [micropython_executable(), "-X", "heapsize=512k", "-c", MEASURE_IMPORT],
        f".frozen:{stage}:{stage / 'lib'}", tmp_path,
    )
    from_rom, rom_path = _import_cost(
        vm_command(["-X", "heapsize=512k", "-c", ROM_MOUNT + MEASURE_IMPORT], image=image),
        ROM_PATH, tmp_path,
    )
    assert file_path == str(stage / "device.mpy") and rom_path == "/rom/device.mpy"
    # Bytecode and constants stay in the image: measured 35.8 KB against 63.1 KB.
    assert from_rom < 0.75 * from_files, (from_rom, from_files)


def test_a_missing_image_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet.boards.romfs", str(tmp_path / "nothing.romfs"), "-c", "print(1)"]) == 1
    assert "nothing.romfs" in capsys.readouterr().err
    assert main(["fleet.boards.romfs"]) == 2
