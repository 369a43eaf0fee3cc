"""Fixtures chained like the real system: a data folder -> a real nats-server
(JetStream + MQTT, free ports) -> clients. Every process started here is
stopped in a finaliser, also when a test fails."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.server import NatsServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    nats = NatsServer(tmp_path / "server")
    nats.start()
    try:
        yield nats
    finally:
        nats.stop()
