"""The memory benchmark's bisection: the smallest passing heap, in steps."""
from __future__ import annotations

from bench.memorybench import first_trouble, smallest


def test_smallest_finds_the_first_passing_size_in_steps() -> None:
    tried: list[int] = []

    def passes(kb: int) -> bool:
        tried.append(kb)
        return kb >= 90

    assert smallest(passes, 16, 128) == 92  # 4 KB steps: 90 rounds up to the next step tried
    assert len(tried) <= 7 and tried[0] == 128


def test_smallest_is_none_when_even_the_largest_fails() -> None:
    assert smallest(lambda kb: False, 16, 128) is None


def test_a_failed_soak_names_the_log_line_and_the_error_it_shows() -> None:
    log = "\n".join([
        "link: up (127.0.0.1:4222)",
        "cmd c1: succeeded",
        "firmware error, restarting in 5 s:",
        "Traceback (most recent call last):",
        '  File "device.py", line 108, in __init__',
        "MemoryError: memory allocation failed, allocating 464 bytes",
        "cmd c2: out of memory",
    ])
    assert first_trouble(log) == (
        "firmware error, restarting in 5 s: MemoryError: memory allocation failed, allocating 464 bytes"
    )
    assert first_trouble("cmd c3: out of memory for its result; sending what was kept\n") == (
        "cmd c3: out of memory for its result; sending what was kept"
    )
    assert first_trouble("link: up\ncmd c4: succeeded\n") is None
