# The sim board's display: a 128x64 framebuf (the same drawing code a Pico W
# runs on its SSD1306) whose show() writes display.png into the flash folder,
# so tests and people can look at it. PNG written by hand: 1-bit greyscale,
# one uncompressed (stored) deflate block, so no compressor is needed.
import binascii
import framebuf
import struct

from state import stream_atomic

WIDTH = 128
HEIGHT = 64


_STRIDE = WIDTH // 8
_RAW = HEIGHT * (1 + _STRIDE)  # each row: filter byte, then the pixels
# Byte offsets in the file's head, everything before the pixels.
_IHDR = 8
_IDAT = _IHDR + 12 + 13
_ZLIB = _IDAT + 8  # after IDAT's length and type
_PIXELS = _ZLIB + 2 + 5  # after the zlib header and the stored block's header
_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # an empty chunk: its crc is fixed
_NO_FILTER = b"\x00"


class PngScreen(framebuf.FrameBuffer):
    # Only the framebuffer is kept, as on a board (the SSD1306 driver's 1 KB):
    # show() streams the PNG into the file row by row, its head laid out
    # once, so the simulator's heap figures are a board's, not a board's
    # plus a picture of its screen.
    def __init__(self, path="display.png"):
        self.path = path
        self.buffer = bytearray(WIDTH * HEIGHT // 8)
        super().__init__(self.buffer, WIDTH, HEIGHT, framebuf.MONO_HLSB)
        head = self.head = bytearray(_PIXELS)
        head[0:8] = b"\x89PNG\r\n\x1a\n"
        struct.pack_into(">I4sIIBBBBB", head, _IHDR, 13, b"IHDR", WIDTH, HEIGHT, 1, 0, 0, 0, 0)
        struct.pack_into(">I", head, _IHDR + 8 + 13, binascii.crc32(memoryview(head)[_IHDR + 4:_IHDR + 8 + 13]))
        struct.pack_into(">I4s", head, _IDAT, 2 + 5 + _RAW + 4, b"IDAT")
        # zlib header, then one final stored (uncompressed) deflate block
        struct.pack_into("<BBBHH", head, _ZLIB, 0x78, 0x01, 0x01, _RAW, _RAW ^ 0xFFFF)
        self.sums = bytearray(8)  # the pixels' adler32, then IDAT's crc

    def show(self):
        # Atomically (a reader never sees half a frame), streamed.
        stream_atomic(self.path, self._write, True)

    def _write(self, f):
        head = self.head
        rows = memoryview(self.buffer)
        crc = binascii.crc32(memoryview(head)[_IDAT + 4:])  # IDAT's type, the zlib and block headers
        a, b = 1, 0  # adler32 of the raw rows, filter bytes included
        f.write(head)
        for at in range(0, len(rows), _STRIDE):
            row = rows[at:at + _STRIDE]
            f.write(_NO_FILTER)
            f.write(row)
            crc = binascii.crc32(row, binascii.crc32(_NO_FILTER, crc))
            b = (b + a) % 65521  # the filter byte, 0
            for byte in row:
                a = (a + byte) % 65521
                b = (b + a) % 65521
        struct.pack_into(">II", self.sums, 0, (b << 16) | a, 0)
        crc = binascii.crc32(memoryview(self.sums)[:4], crc)
        struct.pack_into(">I", self.sums, 4, crc)
        f.write(self.sums)
        f.write(_IEND)
