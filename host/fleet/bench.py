"""`make bench`: measurements printed side by side from one run.

Machines here are shared and noisy, so every figure is printed next to its
baseline measured in the same run, and the ratio is what to read.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .paths import REPO, micropython_executable, micropython_path
from .server import NatsServer

BENCH_DIR = REPO / "tools" / "bench"


def _run_micropython(script: str, *args: str, timeout: float = 300) -> str:
    env = dict(os.environ, MICROPYPATH=f"{micropython_path('sim')}:{BENCH_DIR}")
    result = subprocess.run(
        [micropython_executable(), "-X", "heapsize=128k", str(BENCH_DIR / script), *args],
        env=env, capture_output=True, text=True, timeout=timeout,
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


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "server") as server:
        rates = publish_rates(server)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
