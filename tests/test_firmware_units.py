"""Collects the firmware's unit tests (tests/firmware/mp_test_*.py) and runs
each test function in its own MicroPython unix-port process, with the sim
board profile and the fetched micropython-lib modules on MICROPYPATH, in an
empty folder standing in for flash."""
from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import pytest

from fleet.paths import micropython_executable, micropython_path

HERE = Path(__file__).parent / "firmware"


def _collect() -> list[tuple[str, str]]:
    cases = []
    for path in sorted(HERE.glob("mp_test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                cases.append((path.stem, node.name))
    return cases


@pytest.mark.parametrize("module, function", _collect(), ids=lambda v: v)
def test_firmware(module: str, function: str, tmp_path: Path) -> None:
    env = dict(os.environ)
    env["MICROPYPATH"] = f"{micropython_path('sim')}:{HERE}"
    # The tests import the firmware from source: compiling device.py in the
    # VM takes heap that a board running .mpy never spends, and at 128k a
    # one-line change to it left no 3 KB block for a Device (seen). Memory
    # limits are the memory benchmark's and the heap_lock tests' business.
    result = subprocess.run(
        [micropython_executable(), "-X", "heapsize=512k", str(HERE / "runner.py"), module, function],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0 and f"PASS {function}" in output, output
