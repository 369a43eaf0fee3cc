"""`fleet sim`: the whole system on one machine, with a live table.

Without --mqtt it starts the embedded nats-server and the gateway itself;
with --mqtt it only runs the boards against that broker. Ctrl-C, SIGTERM
or --duration stop everything it started, boards first.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from nats.aio.client import Client

from fleet.gateway.service import Gateway, GatewayConfig
from fleet.broker.connection import connect
from fleet.state.nickname import NicknameService
from fleet.sim.observe import FleetObserver
from fleet.broker.server import NatsServer
from fleet.sim.simulator import Simulator


@dataclass
class SimOptions:
    devices: int
    data_dir: Path
    mqtt: str | None = None
    duration: float | None = None
    refresh: float = 1.0
    telemetry_interval_ms: int = 2000
    nicknames: int = 0  # instances of the nickname service to run (not with mqtt)
    port: int = -1  # NATS client port; -1: a free one
    mqtt_port: int = -1
    context_name: str = "sim"


def fleet_command() -> str:
    """How this user runs `fleet`, to print commands that paste as they are."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "fleet" and argv0.exists():
        return str(argv0.resolve())
    installed = Path(sys.executable).with_name("fleet")
    return str(installed) if installed.exists() else f"{sys.executable} -m fleet"


def parse_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s ago" if seconds >= 1 else "now"


def render_table(sim: Simulator, observer: FleetObserver) -> str:
    now = time.time()
    rows = [("DEVICE", "PROCESS", "ONLINE", "LAST TELEMETRY", "SEQ", "TEMP C", "HEAP FREE")]
    for device_id, device in sorted(sim.devices.items()):
        view = observer.device(device_id)
        reading = view.last_reading or {}
        rows.append(
            (
                device_id,
                f"pid {device.pid}" if device.running else "stopped",
                {True: "yes", False: "no", None: "-"}[view.online],
                _age(now - view.last_seen if view.last_seen else None),
                str(reading.get("seq", "-")),
                str(reading.get("temp_c", "-")),
                str(reading.get("heap_free", "-")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


async def run_simulation(options: SimOptions, out: TextIO = sys.stdout) -> int:
    data_dir = Path(options.data_dir)
    server: NatsServer | None = None
    gateway: Gateway | None = None
    nicknames: list[NicknameService] = []
    nickname_nc: Client | None = None
    header: list[str] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if options.mqtt:
            host, port = parse_host_port(options.mqtt)
        else:
            server = NatsServer(data_dir / "server", port=options.port, mqtt_port=options.mqtt_port)
            server.start()
            host, port = server.host, server.mqtt_port
            gateway = Gateway(GatewayConfig(nats_url=server.url, mqtt_host=server.host, mqtt_port=server.mqtt_port))
            await gateway.start()
            if options.nicknames:
                nickname_nc = await connect(server.url, name="fleet-sim-nicknames")
                for index in range(options.nicknames):
                    service = NicknameService(nickname_nc, f"sim-nickname-{index + 1}")
                    await service.start()
                    nicknames.append(service)
            from fleet.broker.context import record

            record(data_dir, options.context_name, server.url, f"{host}:{port}", "fleet sim")
            fleet = fleet_command()
            header.append(f"nats-server: NATS {server.url}  MQTT mqtt://{host}:{port}  (context {options.context_name}, selected)")
            header.append(f"in another terminal: {fleet} devices")
            if options.nicknames:
                header.append(f"{options.nicknames} nickname instances: {fleet} nickname --push sim-001")
            for line in header:
                print(line, file=out)
        sim = Simulator(data_dir, host, port, settings_defaults={"telemetry_interval_ms": options.telemetry_interval_ms})
        observer = FleetObserver(host, port, client_id=f"fleet-sim-{os.getpid()}")
        observer.start()
        try:
            sim.start_fleet(options.devices)
            print(f"started {options.devices} simulated boards; flash folders in {data_dir / 'devices'}", file=out)
            await _show(sim, observer, options, stop, out, header)
            online = sum(1 for d in sim.devices if observer.device(d).online)
        finally:
            sim.stop_all()
            observer.stop()
        print(f"stopped: {online}/{len(sim.devices)} boards were online at the end", file=out)
        return 0
    finally:
        # Boards are down by now; the rest stops in order, each step bounded,
        # and a step that fails does not keep the next from running.
        for service in nicknames:
            await _bounded(service.stop(), "a nickname instance")
        if nickname_nc is not None:
            await _bounded(nickname_nc.close(), "the nickname connection")
        if gateway:
            await _bounded(gateway.stop(), "the gateway", 20)
        if server:
            server.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _bounded(step: Any, what: str, timeout: float = 5) -> None:
    try:
        await asyncio.wait_for(step, timeout)
    except Exception as error:  # shutting down: say it and go on
        print(f"fleet sim: stopping {what}: {str(error) or type(error).__name__}", file=sys.stderr)


async def _show(sim: Simulator, observer: FleetObserver, options: SimOptions, stop: asyncio.Event, out: TextIO,
                header: list[str]) -> None:
    started = time.monotonic()
    live = out.isatty()
    last_print = 0.0
    while not stop.is_set():
        elapsed = time.monotonic() - started
        if options.duration is not None and elapsed >= options.duration:
            break
        # On a terminal, redraw in place every refresh; in a log, every 5 s.
        if live or elapsed - last_print >= 5:
            table = render_table(sim, observer)
            prefix = "\x1b[H\x1b[2J" if live else ""
            # The addresses stay above the table, where a redrawn screen keeps them.
            top = "".join(line + "\n" for line in header) if live else ""
            print(f"{prefix}{top}fleet sim: {elapsed:.0f}s\n{table}\n", file=out, flush=True)
            last_print = elapsed
        try:
            await asyncio.wait_for(stop.wait(), options.refresh)
        except asyncio.TimeoutError:
            pass
    print(render_table(sim, observer), file=out, flush=True)
