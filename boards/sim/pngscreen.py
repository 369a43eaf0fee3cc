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


def _chunk(kind, data):
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", binascii.crc32(body) & 0xFFFFFFFF)


def _adler32(data):
    a, b = 1, 0
    for byte in data:
        a = (a + byte) % 65521
        b = (b + a) % 65521
    return (b << 16) | a


class PngScreen(framebuf.FrameBuffer):
    def __init__(self, path="display.png"):
        self.path = path
        self.buffer = bytearray(WIDTH * HEIGHT // 8)
        super().__init__(self.buffer, WIDTH, HEIGHT, framebuf.MONO_HLSB)

    def show(self):
        stride = WIDTH // 8
        raw = bytearray()
        for row in range(HEIGHT):
            raw.append(0)  # filter: none
            raw.extend(self.buffer[row * stride:(row + 1) * stride])
        stored = b"\x01" + struct.pack("<HH", len(raw), len(raw) ^ 0xFFFF) + raw  # final, uncompressed
        zlib_stream = b"\x78\x01" + stored + struct.pack(">I", _adler32(raw))
        header = struct.pack(">IIBBBBB", WIDTH, HEIGHT, 1, 0, 0, 0, 0)
        png = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib_stream) + _chunk(b"IEND", b"")
        write_atomic(self.path, png)
