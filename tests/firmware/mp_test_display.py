# Pushed text for the display: bytes to what the 8x8 font can show.
from display import to_text


def test_text_is_ascii_with_one_question_mark_per_other_character_or_bad_byte():
    assert to_text(b"hi \xc3\xa9t\xc3\xa9 \xf0\x9f\x98\x80!") == "hi ?t? ?!"
    assert to_text(b"\xff\xfe\x00\x1bok\n") == "??  ok\n"


class _Watched:
    # A payload that remembers the furthest byte read.
    def __init__(self, data):
        self.data = data
        self.furthest = -1

    def __len__(self):
        return len(self.data)

    def __getitem__(self, at):
        end = at.stop - 1 if isinstance(at, slice) else at
        self.furthest = max(self.furthest, end)
        return self.data[at]


def test_a_large_payload_is_read_only_up_to_the_limit():
    # A 4 KB payload turned into one string per byte, then cut, did not fit
    # a board's fragmented heap (MemoryError): the rest is never looked at.
    payload = _Watched(b"\xc3\xa9" * 2048)
    assert to_text(payload, 256) == "?" * 256
    assert payload.furthest < 2 * 256 + 4, payload.furthest
    assert to_text(b"abc", 2) == "ab"
