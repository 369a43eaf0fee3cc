# Text on a 128x64 monochrome display: 16 columns x 8 lines of the built-in
# 8x8 font. The board profile supplies the screen (an SSD1306 on the Pico W,
# a PNG file in the simulator), any framebuf.FrameBuffer with a show().
COLUMNS = 16
LINES = 8


def to_text(payload, limit=256):
    # Pushed bytes to printable text, at most `limit` characters (the rest
    # is never looked at), written into one buffer of at most `limit`
    # bytes: a fragmented heap has room for that where it had none for a
    # list of one string per character. The 8x8 font has ASCII only: every
    # other character (a whole UTF-8 sequence) becomes one "?", and so does
    # every byte that is not valid UTF-8; control characters become spaces.
    if isinstance(payload, str):
        payload = payload.encode()
    n = len(payload)
    out = bytearray(limit if n > limit else n)  # never more characters than bytes
    i = k = 0
    while i < n and k < len(out):
        b = payload[i]
        if b < 128:
            out[k] = b if (b >= 32 and b != 127) or b == 10 else 32
            i += 1
        else:
            size = 2 if 0xC0 <= b < 0xE0 else 3 if 0xE0 <= b < 0xF0 else 4 if 0xF0 <= b < 0xF8 else 1
            j = i + 1
            if size > 1 and i + size <= n:
                while j < i + size and 0x80 <= payload[j] < 0xC0:
                    j += 1
            # One character beyond the font, or a byte that is not UTF-8.
            i = i + size if size > 1 and j == i + size else i + 1
            out[k] = 63  # "?"
        k += 1
    return str(memoryview(out)[:k], "ascii")


def wrap(text, columns=COLUMNS, lines=LINES):
    # Word wrap; a word longer than a line is cut. Lines beyond the screen
    # are dropped, the last visible one ending in "~" to say so.
    out = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            while len(word) > columns:
                if line:
                    out.append(line)
                    line = ""
                out.append(word[:columns])
                word = word[columns:]
            if not line:
                line = word
            elif len(line) + 1 + len(word) <= columns:
                line += " " + word
            else:
                out.append(line)
                line = word
        out.append(line)
    if len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: columns - 1] + "~"
    return out


def render(screen, text):
    screen.fill(0)
    for row, line in enumerate(wrap(text)):
        screen.text(line, 0, row * 8, 1)
    screen.show()
