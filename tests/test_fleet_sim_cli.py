"""`fleet sim` as a user runs it: bounded, live table, nothing left behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.broker.server import NatsServer


def _processes_under(folder: Path) -> list[int]:
    """Processes whose working folder or command line points into `folder`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(folder)) or str(folder) in cmdline:
            found.append(int(entry.name))
    return found


def _fleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "fleet", *args]


def test_fleet_sim_alone_runs_server_gateway_and_boards_then_stops_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "sim-data"
    result = subprocess.run(
        _fleet("sim", "--devices", "2", "--duration", "8", "--data-dir", str(data), "--nicknames", "2"),
        capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nats-server: NATS nats://127.0.0.1:" in result.stdout
    assert "2 nickname instances" in result.stdout
    lines = result.stdout.strip().splitlines()
    final_table = lines[-4:-1]  # the last table, then the "stopped:" line
    assert final_table[0].startswith("DEVICE"), result.stdout
    for line, device_id in zip(final_table[1:], ("sim-001", "sim-002")):
        assert line.startswith(device_id) and "  yes  " in line, result.stdout
        assert " ago " in line or " now " in line, result.stdout  # telemetry arrived
    assert "2/2 boards were online" in result.stdout
    assert _processes_under(data) == []


def test_fleet_sim_with_mqtt_uses_that_broker_and_ctrl_c_stops_everything(tmp_path: Path, server: NatsServer) -> None:
    data = tmp_path / "sim-data"
    process = subprocess.Popen(
        _fleet("sim", "--devices", "2", "--mqtt", f"127.0.0.1:{server.mqtt_port}", "--data-dir", str(data)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 30
        state = data / "devices" / "sim-002" / "state.json"
        while not state.exists():  # the second board has booted
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        assert not (data / "server").exists()  # nothing else was started
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out
    assert "stopped:" in out
    assert _processes_under(data) == []


def test_simulator_uses_the_vm_named_by_MICROPYTHON(tmp_path: Path, server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet.sim.observe import FleetObserver
    from fleet.paths import micropython_executable
    from fleet.sim.simulator import Simulator

    marker = tmp_path / "used"
    wrapper = tmp_path / "my-micropython"
    wrapper.write_text(f"#!/bin/sh\necho yes > {marker}\nexec {micropython_executable()} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("MICROPYTHON", str(wrapper))
    with Simulator(tmp_path / "sim", server.host, server.mqtt_port) as sim, FleetObserver(server.host, server.mqtt_port) as obs:
        sim.start_fleet(1)
        obs.wait_until(lambda: obs.device("sim-001").online is True, 15, "online")
    assert marker.read_text().strip() == "yes"


def test_ctrl_c_in_a_terminal_stops_the_whole_sim_cleanly_and_the_context_finds_it(tmp_path: Path) -> None:
    # A terminal's Ctrl-C goes to the whole foreground process group: the sim
    # leads its own group here, and SIGINT goes to all of it.
    data = tmp_path / "sim-data"
    ports = [_free_port(), _free_port()]
    process = subprocess.Popen(
        _fleet("sim", "--devices", "1", "--data-dir", str(data), "--port", str(ports[0]), "--mqtt-port", str(ports[1])),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 30
        while not (data / "devices" / "sim-001" / "state.json").exists():
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        # Another terminal, no flag, no environment variable: the sim's context.
        found = subprocess.run(_fleet("devices", "--json"), capture_output=True, text=True, timeout=30,
                               env={k: v for k, v in os.environ.items() if not k.startswith("FLEET_")})
        assert found.returncode == 0, found.stderr
        os.killpg(process.pid, signal.SIGINT)
        out, _ = process.communicate(timeout=40)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, out
    assert f"NATS nats://127.0.0.1:{ports[0]}  MQTT mqtt://127.0.0.1:{ports[1]}" in out
    assert "in another terminal: " in out and " devices" in out
    assert "Traceback" not in out and out.count("Connect call failed") <= 2, out
    # The server stops last: nothing lost its connection to it while stopping.
    assert "lost; reconnecting" not in out and "nats-server exited" not in out, out
    assert "stopped:" in out
    assert _processes_under(data) == []
    # The context stays; the error names the sim that wrote it and is gone.
    gone = subprocess.run(_fleet("devices"), capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1 and "from context sim" in gone.stderr and "no longer running" in gone.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
