# Code a board runs only now and then: a command, a configuration, a
# query (and the rules the configuration is checked by).
#
# Compiled, as every board runs it, it is imported for the message that
# needs it and let go of once that message is done (let_go), so between
# messages it takes no heap. Run in place from a ROM image, an import
# allocates only the functions and classes, about 6 KB on the unix port,
# and costs 20-100 us. From .mpy files it copies the code into the heap
# too: about 14 KB kept for good otherwise, the difference between a
# board that runs in a 100 KB heap and one that does not
# (docs/BENCHMARKS.md). From source (the simulator's default) an import
# compiles, which needs far more heap than it frees: imported once, here,
# before the Device asks for its buffers, and kept.
import asyncio
import sys

from micropython import const

COLD = ("commands", "config", "query", "rules")
FROM_SOURCE = __file__.endswith(".py")
_TRIES = const(5)
_RETRY_MS = const(200)

if FROM_SOURCE:
    for _name in COLD:
        __import__(_name)


def let_go():
    if not FROM_SOURCE:
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
