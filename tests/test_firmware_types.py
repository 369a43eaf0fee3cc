"""The firmware and each board profile type-check against the pinned stubs
of the board's MicroPython port (tools/typecheck_firmware.py, pins in
tools/firmware-stubs.json), and the same check fails on a file that uses
what the port does not have."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "typecheck_firmware.py"
WRONG = Path(__file__).with_name("typecheck_fixtures") / "wrong_port_call.py"
BOARDS = sorted(json.loads((REPO / "tools" / "firmware-stubs.json").read_text())["boards"])
# tools/typecheck_firmware.py prints one "path:line:col: severity: message" per problem.
PROBLEM = re.compile(r"^(?P<path>[^:\n]+):(?P<line>\d+):\d+: (?:error|warning): (?P<message>.*)$", re.MULTILINE)


def typecheck(*args: str) -> subprocess.CompletedProcess[str]:
    # Installs the board's stubs first if `make setup` has not (needs PyPI).
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=600, cwd=REPO)


def test_every_board_with_a_profile_has_pinned_stubs() -> None:
    profiles = sorted(p.parent.name for p in (REPO / "boards").glob("*/board.py"))
    assert BOARDS == profiles


@pytest.mark.parametrize("board", BOARDS)
def test_board_firmware_type_checks_against_its_port(board: str) -> None:
    result = typecheck("--board", board)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"typecheck {board}: " in result.stdout and ": ok (" in result.stdout


def expected_problems(source: Path) -> dict[int, str]:
    """Line number -> the name its "# expect: NAME" comment says is wrong."""
    expected = {}
    for number, line in enumerate(source.read_text().splitlines(), start=1):
        found = re.search(r"# expect: (\w+)", line)
        if found:
            expected[number] = found.group(1)
    return expected


def test_a_wrong_port_call_fails_the_check_naming_it() -> None:
    expected = expected_problems(WRONG)
    assert len(expected) >= 6  # the fixture still covers import, symbol, attribute, constant, signature
    result = typecheck("--board", "pico_w", str(WRONG))
    assert result.returncode == 1, result.stdout + result.stderr
    reported: dict[int, str] = {}
    for problem in PROBLEM.finditer(result.stdout):
        assert Path(problem["path"]).name == WRONG.name, result.stdout
        reported[int(problem["line"])] = problem["message"]
    assert sorted(reported) == sorted(expected), result.stdout
    for line, name in expected.items():
        assert f'"{name}"' in reported[line], f"line {line} should name {name}:\n{result.stdout}"


def test_what_is_wrong_on_one_port_is_right_on_another() -> None:
    # The ESP32 port has an esp32 module: the same file, checked for the
    # ESP32, loses exactly that complaint, so the check follows the board.
    result = typecheck("--board", "esp32", str(WRONG))
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'Import "esp32"' not in result.stdout
    assert 'Import "threading"' in result.stdout
