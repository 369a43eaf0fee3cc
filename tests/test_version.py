"""One version: firmware/protocol.json's "firmware", which the boards report;
the host package and every mip package.json carry the same one."""
from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import fleet
from fleet.paths import BOARDS_DIR, FIRMWARE_DIR, PROTOCOL_FILE

PACKAGE_FILES = [FIRMWARE_DIR / "package.json", *sorted(BOARDS_DIR.glob("*/package.json"))]


def test_the_host_package_takes_the_firmware_version() -> None:
    expected = json.loads(PROTOCOL_FILE.read_text())["firmware"]
    assert fleet.__version__ == expected
    assert version("fleet") == expected  # pyproject.toml reads fleet.__version__


def test_every_mip_package_carries_the_firmware_version() -> None:
    assert len(PACKAGE_FILES) == 4, PACKAGE_FILES
    wrong = {str(path.relative_to(FIRMWARE_DIR.parent)): json.loads(path.read_text()).get("version")
             for path in PACKAGE_FILES if json.loads(path.read_text()).get("version") != fleet.__version__}
    assert wrong == {}, f"bump these to {fleet.__version__}: {wrong}"


def test_no_firmware_module_keeps_a_version_of_its_own() -> None:
    assert [path.name for path in FIRMWARE_DIR.glob("*.py") if "FIRMWARE_VERSION" in path.read_text()] == []
