# Code a board runs only now and then: a command, a configuration, a
# query (and the rules the configuration is checked by).
#
# Run in place from a ROM image, it is imported where it is used and let
# go of once that message, or the boot, is done (let_go): its functions
# and classes, about 6 KB of heap on the unix port, go back to the heap
# instead of staying for good, and importing it again is cheap (its names
# stay interned; its code never leaves the image). From .mpy files an
# import copies the module's code into the heap, so it is imported once,
# here, before the Device asks for its buffers, and kept. (The boot's own
# code, settings.py, is let go of in both cases: see startup.py.)
# docs/ARCHITECTURE.md, "Memory", has the figures.
import asyncio
import sys

from micropython import const

COLD = ("commands", "config", "query", "rules")
IN_PLACE = __file__.startswith("/rom/")
_TRIES = const(5)
_RETRY_MS = const(200)

if not IN_PLACE:
    for _name in COLD:
        __import__(_name)


def let_go():
    if IN_PLACE:
        for name in COLD:
            sys.modules.pop(name, None)


async def load(name):
    # An import asks for a few hundred small blocks; on a fragmented heap
    # it can fail where the message itself would fit, and then costs only
    # time: the caller waits while the other tasks run, and tries again.
    # The number of tries it took, or 0 when it never fitted.
    for attempt in range(_TRIES):
        try:
            __import__(name)
            return attempt + 1
        except MemoryError:
            await asyncio.sleep_ms(_RETRY_MS)
    return 0
