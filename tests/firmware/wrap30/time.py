# Test fixture, never shipped: a `time` whose tick counters wrap at 2^30, as
# a 32-bit board's do, starting 300 ms before the wrap. mp_test_ticks_wrap
# puts this folder first on sys.path before importing any firmware module;
# `time` is an extensible built-in, so this file is imported instead of it.
# (Only for code run without asyncio: the unix port's C task queue keeps its
# own 62-bit ticks, which these would contradict.)
from utime import *  # noqa: F401,F403 (the rest of the port's time)
import utime

PERIOD = 1 << 30
_MASK = PERIOD - 1
_HALF = PERIOD >> 1
START_BEFORE_WRAP_MS = 300
_offset = (PERIOD - START_BEFORE_WRAP_MS - utime.ticks_ms()) & _MASK


def ticks_ms():
    return (utime.ticks_ms() + _offset) & _MASK


def ticks_add(ticks, delta):
    return (ticks + delta) & _MASK


def ticks_diff(end, start):
    return ((end - start + _HALF) & _MASK) - _HALF
