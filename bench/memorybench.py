"""The heap the firmware needs: the smallest `-X heapsize` in which a
simulated board runs a soak with every feature busy, beside the smallest
heap a bare umqtt.simple publish loop needs, found the same way in the
same run.

A soak at one heap size passes when, for its whole length, the board:
records a reading every 200 ms and forwards them (exactly once, so the
gateway is running); has its link cut for 4 s every 30 s (reconnect
retries capped at 10 s), so a backlog builds up and each reconnect brings
a burst; gets a configuration change every 5 s and reports it applied;
runs a command every 2 s (info, display, blink, ping; none may fail);
answers a live query every 3 s; and never logs a MemoryError, an
out-of-memory, or a task restart. The smallest passing size is found by
bisection with short soaks, then confirmed with a long one.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.background import BackgroundGateway
from fleet.client.commands import send
from fleet.client.config import get_config, set_config
from fleet.broker.connection import connect
from fleet.boards.compile import compile_libraries
from fleet.paths import BENCH_DIR, BUILD_DIR, micropython_executable
from fleet.state.query import scatter
from fleet.broker.server import NatsServer
from fleet.sim.simulator import Simulator
from fleet.client.tail import stored

# Signs in a board's log that the heap was too small for it.
TROUBLE = ("MemoryError", "out of memory", "restarting in", "firmware error")


def first_trouble(log: str) -> str | None:
    """The first line of a board's log that shows a sign of TROUBLE, with
    what it names: for a traceback, its last line (the error itself)."""
    lines = log.splitlines()
    for at, line in enumerate(lines):
        if any(sign in line for sign in TROUBLE):
            if line.rstrip().endswith(":"):  # "firmware error, restarting in 5 s:" then a traceback
                error = next((later for later in lines[at + 1:] if not later.startswith((" ", "Traceback"))), None)
                if error:
                    return f"{line.strip()} {error.strip()}"
            return line.strip()
    return None


@dataclass
class Soak:
    heap_kb: int
    seconds: float
    passed: bool = False
    why: str = ""
    readings: int = 0
    commands: int = 0
    configs: int = 0
    queries: int = 0
    heap_free: list[int] = field(default_factory=list)  # as the board reported it, after gc.collect()

    @property
    def steady_used_kb(self) -> float:
        # Heap in use after a collection, at the median reading: what the
        # firmware holds, garbage excluded.
        if not self.heap_free:
            return float("nan")
        free = sorted(self.heap_free)[len(self.heap_free) // 2]
        return (self.heap_kb * 1024 - free) / 1024

    @property
    def peak_used_kb(self) -> float:
        if not self.heap_free:
            return float("nan")
        return (self.heap_kb * 1024 - min(self.heap_free)) / 1024


async def _workload(nats_url: str, device: str, soak: Soak, sim: Simulator, deadline: float) -> None:
    nc = await connect(nats_url, name="memory-bench")
    try:
        tick = 0
        commands = [("info", {}), ("display", {"text": "heap test"}), ("blink", {"times": 2}), ("ping", {})]
        while time.monotonic() < deadline:
            if not sim.devices[device].running:
                soak.why = "the board's process died"
                return
            if tick % 10 == 0:
                interval = 200 if tick % 20 else 250
                await set_config(nats_url, f"device.{device}", [f"telemetry_interval_ms={interval}", f"display=cfg {tick}",
                                                                f"led={'true' if tick % 20 else 'false'}"], None,
                                 force=True)  # the board may not have connected yet: the soak judges that
                soak.configs += 1
            if tick % 4 == 0:
                name, args = commands[(tick // 4) % len(commands)]
                records = await send(nats_url, name, args, device=device, wait=15, force=True)
                if records[0].state != "succeeded" and sim.devices[device].running:
                    # A command sent while the link is cut waits for it: only a failure counts.
                    if records[0].state in ("failed", "rejected"):
                        soak.why = f"command {name} {records[0].state}: {records[0].error}"
                        return
                soak.commands += 1
            if tick % 6 == 0:
                outcome = await scatter(nc, ["==", "id", device], ["heap_free"], timeout=2.0)
                soak.queries += len(outcome.matches)
            if tick % 60 == 30:
                sim.set_link(device, "drop")
            if tick % 60 == 38:
                sim.set_link(device, "pass")
            tick += 1
            await asyncio.sleep(0.5)
        settle = time.monotonic() + 20  # the last change may have gone out just now
        view = await get_config(nats_url, device)
        while not view.in_sync and time.monotonic() < settle:
            await asyncio.sleep(0.5)
            view = await get_config(nats_url, device)
        if not view.in_sync:
            soak.why = f"configuration {view.desired.version} not applied: {view.reported}"
    finally:
        await nc.close()


def soak_firmware(server: NatsServer, data_dir: Path, heap_kb: int, seconds: float, romfs: bool = False) -> Soak:
    """With romfs, the firmware runs in place from a ROM image (fleet.romfs)."""
    soak = Soak(heap_kb, seconds)
    # One device id per soak: the readings of every soak share the server.
    device = f"heap-{heap_kb}k-{int(seconds)}s{'-rom' if romfs else ''}"
    sim = Simulator(data_dir / device, server.host, server.mqtt_port,
                    heap=f"{heap_kb}k", fault_injection=True, compiled=True, romfs=romfs)
    try:
        # Reconnect retries capped at 10 s (the default cap is 60 s): the
        # board is back within seconds of each cut, so every cut ends in a
        # burst (queued commands, the retained configuration, the backlog).
        sim.add(device, telemetry_interval_ms=200, reconnect_max_ms=10_000)
        sim.start(device)
        online = time.monotonic() + 20
        while not sim.devices[device].log_text().count("link: up") and time.monotonic() < online:
            time.sleep(0.2)
        asyncio.run(_workload(server.url, device, soak, sim, time.monotonic() + seconds))
        log = sim.devices[device].log_text()
        trouble = first_trouble(log)
        readings = asyncio.run(stored(server.url, device))
        soak.readings = len(readings)
        soak.heap_free = [
            r.payload["heap_free"] for r in readings
            if isinstance(r.payload, dict) and isinstance(r.payload.get("heap_free"), int)
        ]
        expected = seconds / 0.25 * 0.6  # at the slower of the two intervals, most of it through cuts
        if not soak.why and trouble:
            soak.why = f"the log says: {trouble}"
        if not soak.why and not sim.devices[device].running:
            soak.why = "the board's process died"
        if not soak.why and soak.readings < expected:
            soak.why = f"only {soak.readings} readings stored, expected {expected:.0f}+"
        soak.passed = not soak.why
    finally:
        sim.stop_all()
    return soak


def bare_loop(server: NatsServer, heap_kb: int, seconds: float) -> tuple[bool, str]:
    """umqtt.simple alone, publishing QoS 1 readings for `seconds`."""
    # umqtt.simple from .mpy, as mip installs it and as the firmware runs.
    compiled = BUILD_DIR / "bench-lib"
    compile_libraries(compiled)
    env = dict(os.environ, MICROPYPATH=f".frozen:{compiled}:{BENCH_DIR}")
    try:
        result = subprocess.run(
            [micropython_executable(), "-X", f"heapsize={heap_kb}k", str(BENCH_DIR / "bare_publish.py"),
             server.host, str(server.mqtt_port), str(int(seconds * 1000))],
            env=env, capture_output=True, text=True, timeout=seconds + 60,
        )
    except subprocess.TimeoutExpired:
        return False, "timed out"
    if result.returncode == 0 and "RESULT" in result.stdout:
        return True, ""
    said = (result.stdout + result.stderr).strip().splitlines()
    return False, said[-1] if said else f"exit {result.returncode}"


def smallest(passes: Callable[[int], bool], low_kb: int, high_kb: int, step_kb: int = 4) -> int | None:
    """The smallest heap in [low, high] (a multiple of step) for which
    `passes` holds, assuming more heap never hurts; None if high fails."""
    if not passes(high_kb):
        return None
    while high_kb - low_kb > step_kb:
        middle = (low_kb + high_kb) // 2 // step_kb * step_kb
        if passes(middle):
            high_kb = middle
        else:
            low_kb = middle
    return high_kb


@dataclass
class MemoryFigures:
    firmware_kb: int | None
    bare_kb: int | None
    confirmed: Soak | None
    tried: list[Soak]


def measure(
    server: NatsServer, data_dir: Path, probe_s: float, soak_s: float, log: Callable[[str], None],
    heap_kb: int | None = None, romfs: bool = False,
) -> MemoryFigures:
    """The smallest heap by bisection, confirmed by a soak; with heap_kb,
    only the soak at that size (the bisection's probes are short and the
    long soak is what decides)."""
    tried: list[Soak] = []

    def firmware_passes(heap_kb: int) -> bool:
        soak = soak_firmware(server, data_dir, heap_kb, probe_s, romfs)
        tried.append(soak)
        log(f"  firmware at {heap_kb:>3} KB for {probe_s:.0f} s: {'ok' if soak.passed else soak.why}")
        return soak.passed

    def bare_passes(heap_kb: int) -> bool:
        ok, why = bare_loop(server, heap_kb, min(probe_s, 20))
        log(f"  bare umqtt.simple at {heap_kb:>3} KB: {'ok' if ok else why}")
        return ok

    with BackgroundGateway(server.url, mqtt=(server.host, server.mqtt_port)):
        firmware_kb = heap_kb if heap_kb is not None else smallest(firmware_passes, 16, 128)
        confirmed = None
        while firmware_kb is not None and firmware_kb <= (heap_kb or 128):
            confirmed = soak_firmware(server, data_dir, firmware_kb, soak_s, romfs)
            log(f"  firmware at {firmware_kb:>3} KB for {soak_s:.0f} s: {'ok' if confirmed.passed else confirmed.why}")
            if confirmed.passed:
                break
            firmware_kb += 4  # the short probe was lucky: the long soak decides
        bare_kb = smallest(bare_passes, 4, 64, step_kb=2)
    return MemoryFigures(firmware_kb, bare_kb, confirmed, tried)


__all__ = ["MemoryFigures", "Soak", "bare_loop", "first_trouble", "measure", "smallest", "soak_firmware"]
