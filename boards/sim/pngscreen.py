# The sim board's display: a 128x64 framebuf (the same drawing code a Pico W
# runs on its SSD1306) whose show() writes display.png into the flash folder,
# so tests and people can look at it. PNG written by hand: 1-bit greyscale,
# one uncompressed (stored) deflate block, so no compressor is needed.
import binascii
import framebuf
import struct

from state import write_atomic

WIDTH = 128
HEIGHT = 64


_STRIDE = WIDTH // 8
_RAW = HEIGHT * (1 + _STRIDE)  # each row: filter byte, then the pixels
# Byte offsets in the file, which has the same length every time.
_IHDR = 8
_IDAT = _IHDR + 12 + 13
_ZLIB = _IDAT + 8  # after IDAT's length and type
_PIXELS = _ZLIB + 2 + 5  # after the zlib header and the stored block's header
_IEND = _PIXELS + _RAW + 4 + 4  # after adler32 and IDAT's crc
_SIZE = _IEND + 12


def _adler32(data):
    a, b = 1, 0
    for byte in data:
        a = (a + byte) % 65521
        b = (b + a) % 65521
    return (b << 16) | a


def _seal(png, at, length):
    # A chunk at `at` with `length` bytes of data: its crc covers type and data.
    struct.pack_into(">I", png, at + 8 + length, binascii.crc32(memoryview(png)[at + 4:at + 8 + length]) & 0xFFFFFFFF)


class PngScreen(framebuf.FrameBuffer):
    # The PNG is laid out once and only its pixels, adler32 and crc are
    # rewritten by show(): no allocation per frame, so a tight heap shows
    # text as reliably as a board's SSD1306 does.
    def __init__(self, path="display.png"):
        self.path = path
        self.buffer = bytearray(WIDTH * HEIGHT // 8)
        super().__init__(self.buffer, WIDTH, HEIGHT, framebuf.MONO_HLSB)
        png = self.png = bytearray(_SIZE)
        png[0:8] = b"\x89PNG\r\n\x1a\n"
        struct.pack_into(">I4sIIBBBBB", png, _IHDR, 13, b"IHDR", WIDTH, HEIGHT, 1, 0, 0, 0, 0)
        _seal(png, _IHDR, 13)
        zlib_len = 2 + 5 + _RAW + 4
        struct.pack_into(">I4s", png, _IDAT, zlib_len, b"IDAT")
        # zlib header, then one final stored (uncompressed) deflate block
        struct.pack_into("<BBBHH", png, _ZLIB, 0x78, 0x01, 0x01, _RAW, _RAW ^ 0xFFFF)
        struct.pack_into(">I4s", png, _IEND, 0, b"IEND")
        _seal(png, _IEND, 0)

    def show(self):
        png = self.png
        pixels = memoryview(self.buffer)
        at = _PIXELS
        for row in range(HEIGHT):
            png[at] = 0  # filter: none
            png[at + 1:at + 1 + _STRIDE] = pixels[row * _STRIDE:(row + 1) * _STRIDE]
            at += 1 + _STRIDE
        struct.pack_into(">I", png, at, _adler32(memoryview(png)[_PIXELS:at]))
        _seal(png, _IDAT, 2 + 5 + _RAW + 4)
        write_atomic(self.path, png)
