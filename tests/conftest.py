"""Fixtures chained like the real system: a data folder -> a real nats-server
(JetStream + MQTT, free ports) -> clients. Every process started here is
stopped in a finaliser, also when a test fails."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet.broker.server import NatsServer
from fleet.sim.simulator import Simulator
from support import GatewayThread


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    nats = NatsServer(tmp_path / "server")
    nats.start()
    try:
        yield nats
    finally:
        nats.stop()


@pytest.fixture
def gateway(server: NatsServer) -> Iterator[GatewayThread]:
    """A gateway serving the server: boards' batches need it to be stored
    and acknowledged, as in the real system."""
    with GatewayThread(server.url, mqtt=(server.host, server.mqtt_port)) as running:
        yield running


@pytest.fixture
def simulators(tmp_path: Path, server: NatsServer) -> Iterator[Callable[..., Simulator]]:
    """Makes Simulators against the test's server, each in its own folder
    under tmp_path (default "sim"); stops every board they started."""
    made: list[Simulator] = []

    def make(folder: str = "sim", **options: Any) -> Simulator:
        simulator = Simulator(tmp_path / folder, server.host, server.mqtt_port, **options)
        made.append(simulator)
        return simulator

    try:
        yield make
    finally:
        for simulator in made:
            simulator.stop_all()


@pytest.fixture(autouse=True)
def own_fleet_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's contexts, or follows their environment."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name in ("FLEET_NATS_URL", "FLEET_CONTEXT", "FLEET_MQTT"):
        monkeypatch.delenv(name, raising=False)
