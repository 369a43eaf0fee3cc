"""Flash a board with mpremote: the same path over USB to a Pico W or an
ESP32 and over a socket to a virtual board.

    1. A real board may be running the firmware with its watchdog on, and a
       watchdog cannot be stopped: interrupting the firmware for long would
       get the board reset in the middle of a copy. So the flasher first
       writes SAFE (main.py then leaves the REPL alone), resets the board
       and waits for it to come back.
    2. It asks the board which MicroPython it runs and which .mpy version
       it loads, and refuses clearly when that is too old.
    3. It installs the dependencies with `mpremote mip install` (the
       firmware's package.json and the board profile's).
    4. It compiles the firmware and the profile with mpy-cross and copies
       only the files whose sha256 differs from what the board holds,
       removing any source file that would shadow a compiled one.
    5. It removes SAFE and starts the firmware: a hard reset on a board; on
       a virtual board (no reset in the unix port) `import main`.

Everything goes through the mpremote command line, as a user would run it.
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compile import compile_firmware, mpy_cross_executable
from .paths import BOARDS_DIR, BUILD_DIR, FIRMWARE_DIR
from .protocol import protocol
from .provision import ProvisionError, check_settings

BOARDS = ("pico_w", "esp32", "sim")
VIRTUAL = "sim"  # the board whose target is a virtual board: no reset, no watchdog

Progress = Callable[[str], None]


class FlashError(RuntimeError):
    """Flashing stopped; args[0] says why and what to do."""


def mpremote_executable() -> str:
    return str(Path(sys.executable).with_name("mpremote"))


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def mpy_cross_version() -> tuple[int, int]:
    """(major, sub) of the .mpy files our mpy-cross writes ("mpy v6.3")."""
    result = subprocess.run([str(mpy_cross_executable()), "--version"], capture_output=True, text=True, timeout=30)
    found = re.search(r"mpy v(\d+)\.(\d+)", result.stdout + result.stderr)
    if not found:
        raise FlashError(f"cannot tell which .mpy version mpy-cross writes: {result.stdout.strip()!r}")
    return int(found.group(1)), int(found.group(2))


@dataclass
class BoardInfo:
    """What the flasher learns from the board before it writes anything."""

    micropython: tuple[int, ...]
    mpy: int  # sys.implementation._mpy: version in the low byte, 0 when .mpy is unsupported
    platform: str
    path: list[str]
    hashes: dict[str, str | None]  # file at the top of the flash -> sha256 hex, None when absent

    @property
    def mpy_version(self) -> int:
        return self.mpy & 0xFF

    @property
    def lib_dir(self) -> str:
        # Where `mip` puts libraries: the first sys.path entry ending in /lib.
        for entry in self.path:
            if entry.endswith("/lib"):
                return entry
        return "lib"


def _probe_script(names: list[str]) -> str:
    # Runs on the board: small, no f-strings beyond what 1.21 has, reads
    # files in 512-byte pieces so a big file needs no big buffer.
    return (
        "import sys, json, binascii\n"
        "try:\n import hashlib\nexcept ImportError:\n hashlib = None\n"
        "def _h(n):\n"
        " try:\n"
        "  f = open(n, 'rb')\n"
        " except OSError:\n"
        "  return None\n"
        " d = hashlib.sha256() if hashlib else None\n"
        " while True:\n"
        "  b = f.read(512)\n"
        "  if not b:\n"
        "   break\n"
        "  if d:\n"
        "   d.update(b)\n"
        " f.close()\n"
        " return binascii.hexlify(d.digest()).decode() if d else 'present'\n"
        "print('FLEET-PROBE', json.dumps({'v': list(sys.implementation.version[:3]),"
        " 'mpy': getattr(sys.implementation, '_mpy', 0), 'platform': sys.platform, 'path': sys.path,"
        f" 'files': dict((n, _h(n)) for n in {names!r})}}))\n"
    )


@dataclass
class Mpremote:
    """The mpremote command line, connected to one port; `resume` always:
    the flasher resets the board itself when it means to."""

    port: str
    timeout: float = 120.0
    echo: Progress | None = None

    def run(self, *args: str) -> str:
        command = [mpremote_executable(), "connect", self.port, "resume", *args]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise FlashError(f"mpremote did not finish in {self.timeout:.0f} s: {' '.join(args[:3])} ...")
        if result.returncode != 0:
            said = (result.stderr.strip() or result.stdout.strip()).splitlines()
            what = " ".join(arg.splitlines()[0][:40] for arg in args[:2])
            raise FlashError(f"mpremote {what} failed: {said[-1] if said else result.returncode}")
        if self.echo:
            for line in result.stdout.splitlines():
                if line.strip():
                    self.echo(f"  {line.strip()}")
        return result.stdout

    def probe(self, names: list[str]) -> BoardInfo:
        out = self.run("exec", _probe_script(names))
        for line in out.splitlines():
            if line.startswith("FLEET-PROBE "):
                data = json.loads(line[len("FLEET-PROBE ") :])
                return BoardInfo(
                    micropython=tuple(data["v"]), mpy=int(data["mpy"]), platform=str(data["platform"]),
                    path=list(data["path"]), hashes=dict(data["files"]),
                )
        raise FlashError(f"the board did not answer the probe; it said: {out.strip()[-200:]!r}")

    def wait_ready(self, timeout: float) -> None:
        # After a reset the USB port goes away and comes back.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.run("exec", "print('ready')")
                return
            except FlashError:
                if time.monotonic() > deadline:
                    raise FlashError(f"the board did not come back within {timeout:.0f} s of its reset")
                time.sleep(0.5)


@dataclass
class FlashReport:
    board: BoardInfo
    copied: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)


def check_board(info: BoardInfo, mpy_cross: tuple[int, int]) -> None:
    """Refuse a board whose MicroPython cannot run what we would copy."""
    minimum = parse_version(str(protocol().get("micropython_min", "0")))
    shown = ".".join(str(p) for p in info.micropython)
    wanted = ".".join(str(p) for p in minimum)
    if info.micropython < minimum:
        raise FlashError(
            f"the board runs MicroPython {shown}; this firmware needs {wanted} or newer. "
            "Update the board's MicroPython first (micropython.org/download), then flash again."
        )
    if info.mpy_version != mpy_cross[0]:
        if info.mpy_version == 0:
            raise FlashError(f"the board's MicroPython {shown} cannot load .mpy files")
        raise FlashError(
            f"the board loads .mpy v{info.mpy_version}, mpy-cross writes v{mpy_cross[0]}: "
            "install the mpy-cross that matches the board's MicroPython, or update the board"
        )


def packages_for(board: str) -> list[str]:
    """mip packages: the firmware's dependencies, then the profile's."""
    wanted: list[str] = []
    for manifest in (FIRMWARE_DIR / "package.json", BOARDS_DIR / board / "package.json"):
        if manifest.exists():
            for name, _version in json.loads(manifest.read_text()).get("deps", []):
                if name not in wanted:
                    wanted.append(name)
    return wanted


def check_settings_file(path: Path) -> bytes:
    """The settings file's bytes, once they pass the board's own checks."""
    try:
        data = path.read_bytes()
        raw = json.loads(data)
    except (OSError, ValueError) as e:
        raise FlashError(f"{path}: not a readable JSON file ({e})")
    if not isinstance(raw, dict):
        raise FlashError(f"{path}: must hold a JSON object")
    try:
        check_settings(raw)
    except ProvisionError as error:
        raise FlashError(f"{path}: {error}") from None
    return data


def _reset(mp: Mpremote) -> None:
    # machine.reset() takes the USB port away mid-command: mpremote may
    # report the lost connection, which here is the expected outcome.
    try:
        mp.run("reset")
    except FlashError:
        pass


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def flash(
    board: str,
    port: str,
    settings: Path | None = None,
    index: str | None = None,
    progress: Progress = print,
    verbose: bool = False,
) -> FlashReport:
    if board not in BOARDS:
        raise FlashError(f"unknown board {board!r} (known: {', '.join(BOARDS)})")
    settings_bytes = check_settings_file(settings) if settings else None
    mpy_cross = mpy_cross_version()
    staged_dir = BUILD_DIR / "flash" / board
    progress(f"compiling the firmware for {board} with mpy-cross (mpy v{mpy_cross[0]}.{mpy_cross[1]})")
    compile_firmware(board, staged_dir)
    local_files = sorted(p.name for p in staged_dir.iterdir() if p.is_file())
    wanted = {name: (staged_dir / name).read_bytes() for name in local_files}
    if settings_bytes is not None:
        wanted["settings.json"] = settings_bytes
    shadows = [name[:-4] + ".py" for name in wanted if name.endswith(".mpy")]
    mp = Mpremote(port, echo=progress if verbose else None)

    progress(f"connecting to {port}")
    if board != VIRTUAL:
        # See the module's docstring, step 1.
        mp.run("exec", "open('SAFE', 'w').close()")
        _reset(mp)
        mp.wait_ready(30)
    info = mp.probe(sorted(set(wanted) | set(shadows) | {"SAFE", "settings.json"}))
    progress(
        f"board: MicroPython {'.'.join(map(str, info.micropython))} on {info.platform}, "
        f"loads .mpy v{info.mpy_version}"
    )
    check_board(info, mpy_cross)
    report = FlashReport(board=info)

    packages = packages_for(board)
    if packages:
        progress(f"installing {', '.join(packages)} with mip into {info.lib_dir}")
        args = ["mip", "install", "--target", info.lib_dir]
        if index:
            args += ["--index", index]
        mp.run(*args, *packages)
        report.packages = packages

    steps: list[str] = []
    for name in sorted(wanted):
        if info.hashes.get(name) == _sha256(wanted[name]):
            report.unchanged.append(name)
            continue
        source = settings if name == "settings.json" and settings else staged_dir / name
        steps += ["cp", str(source), f":{name}", "+"]
        report.copied.append(name)
        progress(f"copy {name} ({len(wanted[name]):,} bytes)")
    for name in shadows:
        if info.hashes.get(name):
            steps += ["rm", f":{name}", "+"]
            report.removed.append(name)
            progress(f"remove {name} (it would shadow {name[:-3]}.mpy)")
    if info.hashes.get("SAFE") or board != VIRTUAL:
        steps += ["rm", ":SAFE", "+"]
    if steps:
        mp.run(*steps[:-1])
    progress(f"{len(report.copied)} copied, {len(report.unchanged)} unchanged")
    if settings_bytes is None and not info.hashes.get("settings.json"):
        progress("no settings.json on the board: the firmware will wait for one (fleet provision, then --settings)")

    if board == VIRTUAL:
        progress("starting the firmware (import main: the unix port has no reset)")
        mp.run("exec", "--no-follow", "import main")
    else:
        progress("resetting the board")
        _reset(mp)
    return report


def describe(report: FlashReport) -> dict[str, Any]:
    return {
        "micropython": ".".join(map(str, report.board.micropython)),
        "mpy": report.board.mpy_version,
        "copied": report.copied,
        "unchanged": report.unchanged,
        "removed": report.removed,
        "packages": report.packages,
    }


__all__ = [
    "BOARDS", "BoardInfo", "FlashError", "FlashReport", "Mpremote", "check_board", "check_settings_file",
    "describe", "flash", "mpremote_executable", "mpy_cross_version", "packages_for",
]
