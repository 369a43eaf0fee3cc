"""`make bench` (`python -m bench`): measurements printed side by side from one run.

Machines here are shared and noisy, so every figure is printed next to its
baseline measured in the same run, and the ratio is what to read.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.background import BackgroundGateway
from fleet.gateway.forwarding import DeviceRound, publish_chain
from fleet.broker.connection import connect
from fleet.paths import BENCH_DIR, micropython_executable, micropython_path
from fleet.protocol import TELEMETRY_STREAM
from fleet.state.query import online_devices, scatter
from fleet.broker.server import NatsServer
from fleet.sim.simulator import Simulator
from fleet.client.tail import stored



def _run_micropython(script: str, *args: str, timeout: float = 300, cwd: Path | None = None) -> str:
    env = dict(os.environ, MICROPYPATH=f"{micropython_path('sim')}:{BENCH_DIR}")
    result = subprocess.run(
        [micropython_executable(), "-X", "heapsize=128k", str(BENCH_DIR / script), *args],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def publish_rates(server: NatsServer) -> dict[str, float]:
    """QoS 1 publishes per second for each way of driving umqtt.simple's socket."""
    counts = {"plain": 200, "nodelay": 5000, "packet": 5000, "packet-nagle": 5000}
    rates: dict[str, float] = {}
    for mode, count in counts.items():
        out = _run_micropython("publish_rate.py", mode, server.host, str(server.mqtt_port), str(count))
        line = next(line for line in out.splitlines() if line.startswith("RESULT"))
        _, _, sent, elapsed_ms = line.split()
        rates[mode] = int(sent) / max(int(elapsed_ms), 1) * 1000
    return rates


@dataclass
class ForwardingFigures:
    records: int
    record_bytes: float  # mean size of one reading's JSON
    forwarded_per_s: float  # backlog readings landing in FLEET_TELEMETRY, exactly once
    qos0_per_s: float  # the ceiling: plain umqtt.simple QoS 0, no log (median of 3, see qos0_run)
    python_per_s: float  # nats-py publishes acked per batch: the splitter's own ceiling
    exactly_once: bool
    # CPU per reading forwarded, microseconds: (board, broker, gateway), from
    # the end of the splitter's first round of the backlog to its last.
    cpu_us: tuple[float, float, float] | None
    qos0_board_us: float  # the ceiling's board: its publish loop is busy, so elapsed is CPU
    # The same backlog from a board with a Pico W's heap and batches
    # (PICO_LIKE_*): the sim's default heap is half a Pico W's at 64 bit.
    pico_per_s: float
    pico_exactly_once: bool
    flash_offline_per_record: float  # log writes while offline
    flash_cycle_per_record: float  # offline writes + cursor replaced after each ack + seq reservations
    latencies_ms: list[float]


def _stream_times(nats_url: str, device_id: str) -> list[tuple[int, float, float | None]]:
    """(seq, stored at, recorded at) of every stored reading of a device."""
    readings = asyncio.run(stored(nats_url, device_id, timeout=30))
    rows: list[tuple[int, float, float | None]] = []
    for reading in readings:
        if isinstance(reading.payload, dict):
            ts = reading.payload.get("ts")
            rows.append((int(reading.payload["seq"]), reading.time, float(ts) if isinstance(ts, (int, float)) else None))
    return rows


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"benchmark: timed out waiting for {what}")
        time.sleep(0.2)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _CpuPerRound:
    """Samples the board's, the broker's and the gateway thread's CPU time
    after each of the splitter's rounds until `last_seq` is stored; runs in
    the gateway's thread (time.thread_time is that thread's)."""

    def __init__(self, device_id: str, board_pid: Callable[[], int | None], broker_pid: int, last_seq: int) -> None:
        self.device_id = device_id
        self.board_pid = board_pid
        self.broker_pid = broker_pid
        self.last_seq = last_seq
        self.samples: list[tuple[int, float, float, float]] = []  # newest seq stored, board, broker, gateway
        self.done = False

    def __call__(self, news: dict[str, DeviceRound]) -> None:
        seen = news.get(self.device_id)
        pid = self.board_pid()
        if self.done or seen is None or seen.newest is None or pid is None:
            return
        seq = seen.newest.seq
        self.samples.append((seq, _cpu_seconds(pid), _cpu_seconds(self.broker_pid), time.thread_time()))
        self.done = seq >= self.last_seq

    def per_reading_us(self) -> tuple[float, float, float] | None:
        if len(self.samples) < 2:
            return None
        first, last = self.samples[0], self.samples[-1]
        scale = 1e6 / (last[0] - first[0])
        return ((last[1] - first[1]) * scale, (last[2] - first[2]) * scale, (last[3] - first[3]) * scale)


def _stored_count(nats_url: str) -> int:
    async def count() -> int:
        nc = await connect(nats_url, name="fleet-bench")
        try:
            return (await nc.jetstream().stream_info(TELEMETRY_STREAM)).state.messages
        finally:
            await nc.close()

    return asyncio.run(count())


async def _stream_rate(nats_url: str, stream: str, count: int, timeout: float) -> float:
    """Messages per second as stored: first to last server timestamp, once
    the stream holds `count`."""
    nc = await connect(nats_url, name="fleet-bench")
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while (state := (await js.stream_info(stream)).state).messages < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"benchmark: {stream} holds {state.messages} of {count}")
            await asyncio.sleep(0.1)
        first = await js.get_msg(stream, seq=state.first_seq)
        last = await js.get_msg(stream, seq=state.last_seq)
        assert first.time is not None and last.time is not None
        return (count - 1) / max((last.time - first.time).total_seconds(), 1e-6)
    finally:
        await nc.close()


# A round as the splitter sees one from a board forwarding a backlog with the
# defaults (measured): about 16 batches of about 28 readings (4 KB).
PYTHON_ROUND = 16 * 28


def python_publish_ceiling(server: NatsServer, count: int, per_round: int = PYTHON_ROUND) -> float:
    """The splitter's own ceiling: nats-py JetStream publishes of readings,
    chained and acknowledged a round at a time as the splitter does, no
    board, no log, no MQTT."""
    body = b'{"temp_c":23.31,"uptime_s":1,"heap_free":61952,"backlog":1,"dropped":0,"rssi":-61,"seq":1,"ts":1795689262.556,"boot":1}'

    async def run() -> float:
        nc = await connect(server.url, name="fleet-bench")
        try:
            await nc.jetstream().add_stream(name="BENCH_PY", subjects=["bench.py"])
            started = time.perf_counter()
            previous = None
            for first in range(0, count, per_round):
                round_ = [("bench.py", body, f"b:{n}") for n in range(first, min(first + per_round, count))]
                previous, _ = await publish_chain(nc, round_, previous, 10)
            return count / (time.perf_counter() - started)
        finally:
            await nc.close()

    return asyncio.run(run())


def qos0_run(server: NatsServer, count: int) -> tuple[float, float]:
    """Plain umqtt.simple QoS 0 publishes of the same readings, no log, into
    a stream of their own: readings per second as stored, and the board's
    microseconds per reading.

    A run streams for 50-100 ms only, and its rate moved by half from one
    bench run to the next with the machine's other load: forwarding() runs
    it before, between and after the two backlogs, and reports the median.
    """
    async def empty_stream() -> None:
        nc = await connect(server.url, name="fleet-bench")
        try:
            js = nc.jetstream()
            await js.add_stream(name="BENCH_QOS0", subjects=["bench.qos0"])
            await js.purge_stream("BENCH_QOS0")
        finally:
            await nc.close()

    asyncio.run(empty_stream())
    out = _run_micropython("qos0_ceiling.py", server.host, str(server.mqtt_port), str(count))
    _, sent, elapsed_ms = next(line for line in out.splitlines() if line.startswith("RESULT")).split()
    return asyncio.run(_stream_rate(server.url, "BENCH_QOS0", count, 60)), int(elapsed_ms) * 1000 / int(sent)


# A board like a Pico W in the 64-bit VM: its ~160 KB of heap doubled, and
# 8 KB batches, which that heap affords with room to spare (the sim's
# default 128k, half a Pico W's, keeps the firmware's 4 KB).
PICO_LIKE_HEAP = "320k"
PICO_LIKE_BATCH = 8192


def _with_backlog(sim: Simulator, device_id: str, count: int, batch_bytes: int | None) -> list[str]:
    """A device whose log holds `count` readings; fill_backlog.py's RESULT fields."""
    sizing = {"batch_bytes": batch_bytes} if batch_bytes else {}  # else the firmware's default
    device = sim.add(device_id, telemetry_interval_ms=1000, backlog_budget=4 * 1024 * 1024, **sizing)
    out = _run_micropython("fill_backlog.py", str(count), cwd=device.flash_dir)
    return next(line for line in out.splitlines() if line.startswith("RESULT")).split()


def _backlog_rate(server: NatsServer, device_id: str, count: int) -> tuple[float, bool, list[tuple[int, float, float | None]]]:
    """Once the device's `count` readings are stored: readings per second
    from the first to the last one's stream timestamp, whether they are
    there exactly once and in order, and every stored row of the device."""
    rows = _stream_times(server.url, device_id)
    backlog = [row for row in rows if row[0] < count]
    first, last = backlog[0][1], backlog[-1][1]
    return (len(backlog) - 1) / max(last - first, 1e-6), [row[0] for row in backlog] == list(range(count)), rows


def forwarding(server: NatsServer, data: Path, count: int = 10_000, latency_s: int = 60, batch_bytes: int | None = None) -> ForwardingFigures:
    """A board boots with `count` readings in its log and forwards them; then
    records one reading a second while online. Then a board like a Pico W
    forwards the same backlog."""
    sim = Simulator(data / "sim", server.host, server.mqtt_port)
    _, records, size, _, offline, cycle, state_bytes = _with_backlog(sim, "bench-001", count, batch_bytes)
    pico_sim = Simulator(data / "sim-pico", server.host, server.mqtt_port, heap=PICO_LIKE_HEAP)
    _with_backlog(pico_sim, "bench-pico", count, PICO_LIKE_BATCH)
    ceiling = [qos0_run(server, count)]  # then one between and one after the backlogs
    python_per_s = python_publish_ceiling(server, count)
    assert server.process is not None
    cpu = _CpuPerRound("bench-001", lambda: sim.devices["bench-001"].pid, server.process.pid, count - 1)
    with BackgroundGateway(server.url, mqtt=(server.host, server.mqtt_port)) as gateway:
        splitter = gateway.gateway.splitter
        assert splitter is not None and splitter.on_round is not None
        note_round = splitter.on_round

        def on_round(news: dict[str, DeviceRound]) -> None:
            note_round(news)
            cpu(news)

        splitter.on_round = on_round
        try:
            sim.start("bench-001")
            _wait(lambda: _stored_count(server.url) >= count, 600, f"{count} readings in the stream")
            forwarded_per_s, exactly_once, rows = _backlog_rate(server, "bench-001", count)
            # Live: readings recorded after the backlog, one a second.
            started = len(rows)
            _wait(lambda: len(_stream_times(server.url, "bench-001")) >= started + latency_s, latency_s * 2 + 30, "live readings")
            live = [row for row in _stream_times(server.url, "bench-001") if row[0] >= count][-latency_s:]
            sim.stop_all()
            ceiling.append(qos0_run(server, count))
            before = _stored_count(server.url)
            pico_sim.start("bench-pico")
            _wait(lambda: _stored_count(server.url) >= before + count, 600, f"{count} more readings in the stream")
            pico_per_s, pico_exactly_once, _ = _backlog_rate(server, "bench-pico", count)
        finally:
            sim.stop_all()
            pico_sim.stop_all()
    ceiling.append(qos0_run(server, count))
    latencies = [(stored_at - recorded) * 1000 for _, stored_at, recorded in live if recorded is not None]
    return ForwardingFigures(
        records=int(records),
        record_bytes=int(size) / int(records),
        forwarded_per_s=forwarded_per_s,
        qos0_per_s=statistics.median(rate for rate, _ in ceiling),
        python_per_s=python_per_s,
        exactly_once=exactly_once,
        cpu_us=cpu.per_reading_us(),
        qos0_board_us=statistics.median(board_us for _, board_us in ceiling),
        pico_per_s=pico_per_s,
        pico_exactly_once=pico_exactly_once,
        flash_offline_per_record=int(offline) / 2000,
        flash_cycle_per_record=int(cycle) / 2000 + float(state_bytes),
        latencies_ms=latencies,
    )


async def _nats_responders_round(nats_url: str, count: int, rounds: int) -> list[float]:
    """The baseline: the same scatter-gather to `count` plain NATS responders."""
    import nats

    responder = await nats.connect(nats_url)
    asker = await nats.connect(nats_url)
    try:
        for index in range(count):
            async def answer(message: Any, index: int = index) -> None:
                await responder.publish(f"bench.answer.{index}", b'{"match": true}')

            await responder.subscribe("bench.query", cb=answer)
        await responder.flush()
        times = []
        for _ in range(rounds):
            got = 0
            done = asyncio.Event()

            async def collect(message: Any) -> None:
                nonlocal got
                got += 1
                if got == count:
                    done.set()

            subscription = await asker.subscribe("bench.answer.*", cb=collect)
            await asker.flush()
            started = time.perf_counter()
            await asker.publish("bench.query", b"{}")
            await asyncio.wait_for(done.wait(), 30)
            times.append(time.perf_counter() - started)
            await subscription.unsubscribe()
        return times
    finally:
        await asker.close()
        await responder.close()


async def _board_rounds(nats_url: str, count: int, rounds: int) -> list[float]:
    nc = await connect(nats_url, name="fleet-bench")
    try:
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            outcome = await scatter(nc, None, ["id"], 30)
            times.append(time.perf_counter() - started)
            if len(outcome.answered) < count:
                raise RuntimeError(f"benchmark: {len(outcome.answered)} of {count} boards answered")
        return times
    finally:
        await nc.close()


def query_times(server: NatsServer, data: Path, count: int = 200, rounds: int = 5) -> tuple[float, float]:
    """Median seconds to hear every one of `count` simulated boards, and the
    same scatter-gather to `count` plain NATS responders."""
    sim = Simulator(data / "query-sim", server.host, server.mqtt_port,
                    settings_defaults={"telemetry_interval_ms": 600_000, "keepalive_s": 60})
    with BackgroundGateway(server.url, mqtt=(server.host, server.mqtt_port)):
        try:
            for index in range(count):
                sim.start(sim.add(f"q-{index:03d}").device_id)

            async def online() -> int:
                nc = await connect(server.url, name="fleet-bench")
                try:
                    return len(await online_devices(nc))
                finally:
                    await nc.close()

            _wait(lambda: asyncio.run(online()) >= count, 120, f"{count} boards online")
            boards = asyncio.run(_board_rounds(server.url, count, rounds))
        finally:
            sim.stop_all()
    plain = asyncio.run(_nats_responders_round(server.url, count, rounds))
    return sorted(boards)[len(boards) // 2], sorted(plain)[len(plain) // 2]


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("throughput", "memory"), help="run one part (default: both)")
    parser.add_argument("--soak", type=float, default=600, metavar="SECONDS",
                        help="the long run that confirms the smallest heap (default: %(default)s)")
    parser.add_argument("--probe", type=float, default=30, metavar="SECONDS",
                        help="each short run of the heap bisection (default: %(default)s)")
    parser.add_argument("--heap", type=int, metavar="KB",
                        help="skip the bisection: soak the firmware at this heap only")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--romfs", action="store_true",
                        help="memory: only the firmware run in place from a ROM image, as a board with a ROM partition runs it")
    source.add_argument("--mpy", action="store_true", help="memory: only the firmware run from .mpy files")
    args = parser.parse_args(argv)
    if args.only != "memory":
        throughput()
    if args.only != "throughput":
        # Both by default: a board with a ROM partition runs the image, a
        # stock one the .mpy files.
        sources = (True,) if args.romfs else (False,) if args.mpy else (True, False)
        for at, romfs in enumerate(sources):
            if at or args.only is None:
                print()
            memory(args.probe, args.soak, args.heap, romfs)
    return 0


def memory(probe_s: float, soak_s: float, heap_kb: int | None = None, romfs: bool = False) -> None:
    from .memorybench import measure

    source = "in place from a ROM image" if romfs else "from .mpy"
    print(f"Heap: the smallest -X heapsize (unix port, 64-bit) that runs the whole firmware {source},")
    print("every feature busy (see bench/memorybench.py), beside a bare umqtt.simple loop in the same run")
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "server") as server:
        figures = measure(server, Path(tmp), probe_s, soak_s, lambda line: print(line, flush=True), heap_kb, romfs)
    soak = figures.confirmed
    bare = f"{figures.bare_kb} KB" if figures.bare_kb else "more than 64 KB"
    print(f"  {'bare umqtt.simple QoS 1 loop, smallest heap':<52}{bare:>10}")
    if soak is None:
        print("  the firmware did not pass at 128 KB: see the lines above")
        return
    verdict = f"{soak_s:.0f} s soak passed" if soak.passed else f"{soak_s:.0f} s soak FAILED: {soak.why}"
    print(f"  {'firmware at ' + str(soak.heap_kb) + ' KB':<52}{verdict}")
    if soak.passed and figures.bare_kb:
        print(f"  {'  ratio to the bare loop':<52}{soak.heap_kb / figures.bare_kb:>7.1f}")
    print(f"  {'  steady use (median, after gc.collect())':<52}{soak.steady_used_kb:>7.1f} KB")
    print(f"  {'  peak use seen in readings':<52}{soak.peak_used_kb:>7.1f} KB")
    print(f"  {'  readings / commands / configs / query answers':<52}"
          f"{soak.readings:>6} / {soak.commands} / {soak.configs} / {soak.queries}")


def throughput() -> None:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "server") as server:
        rates = publish_rates(server)
        figures = forwarding(server, Path(tmp))
        boards_s, plain_s = query_times(server, Path(tmp))
    print_publish_rates(rates)
    print()
    print(f"Store-and-forward: a backlog of {figures.records:,} readings ({figures.record_bytes:.0f} bytes each), MicroPython unix port, loopback")
    print(f"{'':<52}{'readings/s':>12}{'ratio':>8}")
    print(f"{'ceiling: umqtt.simple QoS 0, no log (median of 3)':<52}{figures.qos0_per_s:>12.0f}{1:>8.2f}")
    print(f"{f'nats-py chained publishes, acked {PYTHON_ROUND} at a time':<52}{figures.python_per_s:>12.0f}{figures.python_per_s / figures.qos0_per_s:>8.2f}")
    label = "forwarded into FLEET_TELEMETRY, exactly once" if figures.exactly_once else "forwarded (NOT exactly once!)"
    print(f"{label:<52}{figures.forwarded_per_s:>12.0f}{figures.forwarded_per_s / figures.qos0_per_s:>8.2f}")
    label = f"  the same, a Pico W's heap ({PICO_LIKE_HEAP}), {PICO_LIKE_BATCH // 1024} KB batches"
    if not figures.pico_exactly_once:
        label += " (NOT exactly once!)"
    print(f"{label:<52}{figures.pico_per_s:>12.0f}{figures.pico_per_s / figures.qos0_per_s:>8.2f}")
    if figures.cpu_us is not None:
        board, broker, gateway = figures.cpu_us
        print(f"CPU per reading forwarded ({os.cpu_count()} cores here): board {board:.1f} us, "
              f"nats-server {broker:.1f} us, gateway {gateway:.1f} us")
        print(f"  (the ceiling's board: {figures.qos0_board_us:.1f} us per reading)")
    print()
    print("Flash written per reading")
    print(f"  reading's own size               {figures.record_bytes:7.1f} bytes")
    print(f"  recorded offline (log)           {figures.flash_offline_per_record:7.1f} bytes  ({figures.flash_offline_per_record / figures.record_bytes:.2f}x)")
    print(f"  whole cycle (+cursor, +seq)      {figures.flash_cycle_per_record:7.1f} bytes  ({figures.flash_cycle_per_record / figures.record_bytes:.2f}x)")
    print(f"  online, acknowledged from RAM    {0.0:7.1f} bytes of log (+seq reservations)")
    print()
    lat = figures.latencies_ms
    if lat:
        print(f"Live latency, reading recorded -> stored in FLEET_TELEMETRY, {len(lat)} readings at 1/s")
        print(f"  p50 {_percentile(lat, 0.5):6.1f} ms   p99 {_percentile(lat, 0.99):6.1f} ms   max {max(lat):6.1f} ms")
    print()
    print("Live query: every answer from 200 boards (median of 5), against 200 plain NATS responders")
    print(f"  simulated boards (real firmware, MQTT)   {boards_s * 1000:8.1f} ms")
    print(f"  plain NATS responders (nats-py)          {plain_s * 1000:8.1f} ms   ratio {boards_s / plain_s:.1f}")


def print_publish_rates(rates: dict[str, float]) -> None:
    base = rates["plain"]
    print("QoS 1 publish rate through umqtt.simple, loopback, MicroPython unix port")
    print(f"{'socket':<44}{'msgs/s':>10}{'x plain':>10}")
    labels = {
        "plain": "umqtt.simple's own socket (Nagle on)",
        "nodelay": "own socket + TCP_NODELAY",
        "packet": "firmware PacketSocket (1 write/packet, NODELAY)",
        "packet-nagle": "firmware PacketSocket, Nagle left on",
    }
    for mode, rate in rates.items():
        print(f"{labels[mode]:<44}{rate:>10.0f}{rate / base:>10.1f}")


if __name__ == "__main__":
    sys.exit(main())
