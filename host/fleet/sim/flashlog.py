"""Read a board's store-and-forward log from a copy of its flash folder.

The format is firmware/backlog.py's: segment files NNNNNNNN.seg of records
[length u16 LE][crc32 u32 LE][body], and cursor.json with the position of the
first record the broker has not acknowledged. Used by the tests to know what
a board had flushed when its power was cut, and by people to look inside a
board's log (copied off with `mpremote cp -r :log .`).
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

_HEADER = struct.Struct("<HI")
_MAX_RECORD = 1024


@dataclass
class FlashLog:
    waiting: list[bytes] = field(default_factory=list)  # flushed, not yet acknowledged, oldest first
    acknowledged: int = 0  # records still on flash behind the cursor
    corrupt: int = 0  # segments that end in a torn or corrupt record
    dropped: int = 0  # the board's count of records lost to its budget


def _records(data: bytes) -> tuple[list[tuple[int, bytes]], bool]:
    """(offset, body) of each good record, and whether the segment ends badly."""
    found: list[tuple[int, bytes]] = []
    at = 0
    while at + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, at)
        body = data[at + _HEADER.size : at + _HEADER.size + length]
        if length > _MAX_RECORD or len(body) != length or zlib.crc32(body) != crc:
            return found, True
        found.append((at, body))
        at += _HEADER.size + length
    return found, at != len(data)


def read_log(folder: Path) -> FlashLog:
    result = FlashLog()
    if not folder.is_dir():
        return result
    segments = sorted(int(path.name[:8]) for path in folder.glob("*.seg") if path.name[:8].isdigit())
    cursor_seg, cursor_off = (segments[0] if segments else 1), 0
    try:
        cursor = json.loads((folder / "cursor.json").read_text())
        cursor_seg, cursor_off = int(cursor["seg"]), int(cursor["off"])
        result.dropped = int(cursor.get("dropped", 0))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    for number in segments:
        records, bad_end = _records((folder / f"{number:08d}.seg").read_bytes())
        result.corrupt += bad_end
        for offset, body in records:
            if number > cursor_seg or (number == cursor_seg and offset >= cursor_off):
                result.waiting.append(body)
            else:
                result.acknowledged += 1
    return result


__all__ = ["FlashLog", "read_log"]
