# The virtual board's ROM partition, run in its VM before the REPL: what a
# board's runtime built with ROMFS gives (vfs.rom_ioctl over its memory-
# mapped flash partition, mounted at /rom, /rom and /rom/lib on sys.path),
# over the memory `python -m fleet.boards.romfs --partition FILE` maps from FILE,
# so `mpremote romfs deploy` writes it as it writes a board's, and what it
# writes stays in FILE. The unix port has neither, hence this.
import os
import sys
import uctypes
import vfs as _real_vfs

_address, _size = [int(part) for part in os.getenv("FLEET_SIM_ROMFS").split(":")]
_partition = uctypes.bytearray_at(_address, _size)
_BLOCK = 4096  # an erase block, as a board's flash has
_ROMFS_MAGIC = b"\xd2\xcd\x31"


def _erase(offset, length):
    blank = b"\xff" * _BLOCK
    end = offset + length
    while offset < end:
        step = min(_BLOCK, end - offset)
        _partition[offset : offset + step] = blank[:step]
        offset += step


def _rom_ioctl(op, *args):
    # The operations mpremote uses; partition 0 is the only one.
    if op == 1:  # how many partitions
        return 1
    if not args or args[0] != 0:
        return -19  # no such partition (ENODEV)
    if op == 2:  # the partition's memory
        return memoryview(_partition)
    if op == 3:  # prepare to write: erase (all that will be written, or a range)
        offset, length = (0, args[1]) if len(args) == 2 else (args[1], args[2])
        _erase(offset, length)
        return 4  # the smallest write
    if op == 4:  # write bytes at an offset
        offset, data = args[1], args[2]
        _partition[offset : offset + len(data)] = data
        return 0
    if op == 5:  # writing done
        return 0
    if op == 6:  # erase block size
        return _BLOCK
    return -22  # EINVAL


class _Vfs:
    pass


# `import vfs` finds this first: the port's vfs, plus rom_ioctl.
_vfs = _Vfs()
for _name in dir(_real_vfs):
    if not _name.startswith("__"):
        setattr(_vfs, _name, getattr(_real_vfs, _name))
_vfs.rom_ioctl = _rom_ioctl
sys.modules["vfs"] = _vfs

if bytes(_partition[:3]) == _ROMFS_MAGIC:
    _real_vfs.mount(_real_vfs.VfsRom(memoryview(_partition)), "/rom")
# After the flash folder and the frozen modules, as on a board.
_at = sys.path.index(".frozen") + 1 if ".frozen" in sys.path else len(sys.path)
sys.path[_at:_at] = ["/rom", "/rom/lib"]
del _name, _at
