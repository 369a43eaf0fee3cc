"""The memory benchmark's bisection: the smallest passing heap, in steps."""
from __future__ import annotations

from fleet.memorybench import smallest


def test_smallest_finds_the_first_passing_size_in_steps() -> None:
    tried: list[int] = []

    def passes(kb: int) -> bool:
        tried.append(kb)
        return kb >= 90

    assert smallest(passes, 16, 128) == 92  # 4 KB steps: 90 rounds up to the next step tried
    assert len(tried) <= 7 and tried[0] == 128


def test_smallest_is_none_when_even_the_largest_fails() -> None:
    assert smallest(lambda kb: False, 16, 128) is None
