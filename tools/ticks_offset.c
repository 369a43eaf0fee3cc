/* LD_PRELOAD shim for the simulator: moves CLOCK_MONOTONIC (which the
 * MicroPython unix port's ticks_ms() reads) so that the VM's tick counter
 * starts FLEET_SIM_TICKS_BEFORE_WRAP_MS milliseconds before it wraps at
 * 2^62 ms. Everything in the VM that counts ticks (the firmware, asyncio's
 * C task queue) then crosses the wrap together, as on a board, whose
 * counter wraps at 2^30 ms. Built by `make setup` into build/. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);
static int64_t offset_ms;
static int ready;

static void setup(void) {
    struct timespec now;
    real_clock_gettime = dlsym(RTLD_NEXT, "clock_gettime");
    const char *before = getenv("FLEET_SIM_TICKS_BEFORE_WRAP_MS");
    if (before && real_clock_gettime && real_clock_gettime(CLOCK_MONOTONIC, &now) == 0) {
        int64_t now_ms = (int64_t)now.tv_sec * 1000 + now.tv_nsec / 1000000;
        offset_ms = ((int64_t)1 << 62) - atoll(before) - now_ms;
    }
    ready = 1;
}

int clock_gettime(clockid_t clock, struct timespec *ts) {
    if (!ready) {
        setup();
    }
    int result = real_clock_gettime(clock, ts);
    if (result == 0 && offset_ms && (clock == CLOCK_MONOTONIC || clock == CLOCK_MONOTONIC_RAW)) {
        ts->tv_sec += offset_ms / 1000;
        ts->tv_nsec += (offset_ms % 1000) * 1000000;
        if (ts->tv_nsec >= 1000000000) {
            ts->tv_sec += 1;
            ts->tv_nsec -= 1000000000;
        }
    }
    return result;
}
