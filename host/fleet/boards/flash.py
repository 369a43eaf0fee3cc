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

With --romfs, step 4 packs the compiled firmware and profile into a ROM
image (`mpremote romfs build`) and writes it to the board's ROM partition
with `mpremote romfs deploy`, unless the partition already holds it; only
main.py and the settings go to the flash, and any copy of the firmware
there, which would be imported before /rom, is removed. The code then runs
in place from flash and takes far less heap. It needs a MicroPython built
with ROMFS (1.25+ with a ROM partition); the flasher says so when the board
has none.

Everything goes through the mpremote command line, as a user would run it.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.boards.compile import compile_firmware, mpy_cross_executable
from fleet.paths import BOARDS_DIR, BUILD_DIR, FIRMWARE_DIR, mpremote_executable
from fleet.errors import FleetError
from fleet.protocol import protocol
from fleet.boards.provision import ProvisionError, check_settings
from fleet.boards.romfs import RomfsError, pack_image

BOARDS = ("pico_w", "esp32", "sim")
VIRTUAL = "sim"  # the board whose target is a virtual board: no reset, no watchdog

Progress = Callable[[str], None]


class FlashError(FleetError, RuntimeError):
    """Flashing stopped; args[0] says why and what to do."""


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
    # The ROM partition: [size, sha256 of its first bytes (as many as the
    # image to deploy has)], or None when the board has none.
    rom: list[Any] | None = None

    @property
    def mpy_version(self) -> int:
        return self.mpy & 0xFF

    @property
    def lib_dir(self) -> str:
        # Where `mip` puts libraries: the first sys.path entry ending in
        # /lib, other than the ROM partition's (read only).
        for entry in self.path:
            if entry.endswith("/lib") and not entry.startswith("/rom"):
                return entry
        return "lib"


def _probe_script(names: list[str], rom_bytes: int = 0) -> str:
    # Runs on the board: small, no f-strings beyond what 1.21 has, reads
    # files in 512-byte pieces so a big file needs no big buffer. With
    # rom_bytes, also the ROM partition: its size and the sha256 of its
    # first rom_bytes bytes.
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
        "def _rom(n):\n"
        " try:\n"
        "  import vfs\n"
        "  if not n or not hasattr(vfs, 'rom_ioctl') or vfs.rom_ioctl(1) < 1:\n"
        "   return None\n"
        "  m = vfs.rom_ioctl(2, 0)\n"
        "  if isinstance(m, int) or hasattr(m, 'ioctl'):\n"
        "   return None\n"
        "  m = memoryview(m)\n"
        "  if not hashlib:\n"
        "   return [len(m), None]\n"
        "  d = hashlib.sha256()\n"
        "  for i in range(0, min(n, len(m)), 512):\n"
        "   d.update(bytes(m[i:min(i + 512, n)]))\n"
        "  return [len(m), binascii.hexlify(d.digest()).decode()]\n"
        " except Exception:\n"
        "  return None\n"
        "print('FLEET-PROBE', json.dumps({'v': list(sys.implementation.version[:3]),"
        " 'mpy': getattr(sys.implementation, '_mpy', 0), 'platform': sys.platform, 'path': sys.path,"
        f" 'files': dict((n, _h(n)) for n in {names!r}), 'rom': _rom({rom_bytes})}}))\n"
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

    def probe(self, names: list[str], rom_bytes: int = 0) -> BoardInfo:
        out = self.run("exec", _probe_script(names, rom_bytes))
        for line in out.splitlines():
            if line.startswith("FLEET-PROBE "):
                data = json.loads(line[len("FLEET-PROBE ") :])
                return BoardInfo(
                    micropython=tuple(data["v"]), mpy=int(data["mpy"]), platform=str(data["platform"]),
                    path=list(data["path"]), hashes=dict(data["files"]), rom=data.get("rom"),
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
    rom: str = ""  # with --romfs: "deployed" or "unchanged"


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
    romfs: bool = False,
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
    image: Path | None = None
    in_rom: list[str] = []  # with --romfs: what goes in the image, and must not be on the flash
    if romfs:
        image = _rom_image(staged_dir, BUILD_DIR / "flash" / f"{board}.romfs")
        in_rom = [name for name in wanted if name != "main.py"]
        wanted = {"main.py": wanted["main.py"]}
    if settings_bytes is not None:
        wanted["settings.json"] = settings_bytes
    compiled = list(wanted) + in_rom
    shadows = [name[:-4] + ".py" for name in compiled if name.endswith(".mpy")]
    mp = Mpremote(port, echo=progress if verbose else None)

    progress(f"connecting to {port}")
    if board != VIRTUAL:
        # See the module's docstring, step 1.
        mp.run("exec", "open('SAFE', 'w').close()")
        _reset(mp)
        mp.wait_ready(30)
    image_bytes = image.read_bytes() if image else b""
    info = mp.probe(sorted(set(wanted) | set(in_rom) | set(shadows) | {"SAFE", "settings.json"}), len(image_bytes))
    progress(
        f"board: MicroPython {'.'.join(map(str, info.micropython))} on {info.platform}, "
        f"loads .mpy v{info.mpy_version}"
    )
    check_board(info, mpy_cross)
    report = FlashReport(board=info)
    if image is not None:  # first: a board without a ROM partition is refused before its firmware is touched
        report.rom = _deploy_rom(mp, info, image, image_bytes, progress)

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
    for name in in_rom:
        if info.hashes.get(name):
            steps += ["rm", f":{name}", "+"]
            report.removed.append(name)
            progress(f"remove {name} (it would shadow /rom/{name})")
    if info.hashes.get("SAFE") or board != VIRTUAL:
        steps += ["rm", ":SAFE", "+"]
    if steps:
        mp.run(*steps[:-1])
    progress(f"{len(report.copied)} copied, {len(report.unchanged)} unchanged")
    if settings_bytes is None and not info.hashes.get("settings.json"):
        progress("no settings.json on the board: the firmware will wait for one (fleet provision, then --settings)")

    if board == VIRTUAL:
        progress("starting the firmware (import main: the unix port has no reset)")
        # A board's runtime mounts the new image at its reset; here, now.
        remount = _REMOUNT_ROM if report.rom == "deployed" else ""
        mp.run("exec", "--no-follow", remount + "import main")
    else:
        progress("resetting the board")
        _reset(mp)
    return report


# What a board's reset does for a new image: modules imported from the
# old one go (their bytecode was read in place, and is overwritten now),
# and the partition is mounted again.
_REMOUNT_ROM = (
    "import sys, vfs\n"
    "for n in [n for n, m in sys.modules.items() if str(getattr(m, '__file__', '')).startswith('/rom/')]:\n"
    " del sys.modules[n]\n"
    "try:\n vfs.umount('/rom')\nexcept OSError:\n pass\n"
    "vfs.mount(vfs.VfsRom(vfs.rom_ioctl(2, 0)), '/rom')\n"
)


def _rom_image(staged_dir: Path, image: Path) -> Path:
    """The staged firmware, all but main.py (the boards run it from the
    flash), packed into a ROM image by `mpremote romfs build`."""
    folder = image.with_suffix(".stage")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for path in staged_dir.iterdir():
        if path.is_file() and path.name != "main.py":
            shutil.copyfile(path, folder / path.name)
    try:
        pack_image(folder, image)
    except RomfsError as error:
        raise FlashError(str(error)) from None
    return image


def _deploy_rom(mp: Mpremote, info: BoardInfo, image: Path, data: bytes, progress: Progress) -> str:
    """Write the image to the board's ROM partition unless it holds it already."""
    if info.rom is None:
        raise FlashError(
            "the board has no ROM partition: its MicroPython was built without ROMFS (it needs 1.25 or newer "
            "with a ROM partition, which the stock Pico W and ESP32 builds do not have). Flash without --romfs."
        )
    size, digest = int(info.rom[0]), info.rom[1]
    if len(data) > size:
        raise FlashError(f"the ROM image is {len(data):,} bytes; the board's ROM partition holds {size:,}")
    if digest == _sha256(data):
        progress(f"ROM image unchanged ({len(data):,} bytes)")
        return "unchanged"
    progress(f"deploying the ROM image ({len(data):,} bytes) to the board's {size:,}-byte ROM partition")
    mp.run("romfs", "deploy", str(image))
    return "deployed"


def describe(report: FlashReport) -> dict[str, Any]:
    return {
        "micropython": ".".join(map(str, report.board.micropython)),
        "mpy": report.board.mpy_version,
        "copied": report.copied,
        "unchanged": report.unchanged,
        "removed": report.removed,
        "packages": report.packages,
        "rom": report.rom,
    }


__all__ = [
    "BOARDS", "BoardInfo", "FlashError", "FlashReport", "Mpremote", "check_board", "check_settings_file",
    "describe", "flash", "mpremote_executable", "mpy_cross_version", "packages_for",
]
