"""The whole chain on a server in operator mode: a simulated board with its
own identity (its id as MQTT username, a device JWT as password), a
gateway with credentials of its own, and strangers refused."""
from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from bench.background import BackgroundGateway
from fleet.broker.accounts import Authority
from fleet.broker.server import NatsServer
from fleet.client.tail import stored
from fleet.sim.simulator import Simulator
from support import registered, wait_for


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "server", authority=Authority(tmp_path / "server" / "authority"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gateway(secured: NatsServer) -> Iterator[BackgroundGateway]:
    """A gateway with an identity of its own: a .creds file, and a bearer JWT for its MQTT link."""
    with BackgroundGateway(secured.url, mqtt=(secured.host, secured.mqtt_port),
                           creds=str(secured.creds_file("gateway")), mqtt_password=secured.bearer_jwt("gateway")) as running:
        yield running


@pytest.fixture
def sim(secured: NatsServer, tmp_path: Path) -> Iterator[Simulator]:
    """Boards that each get their own identity from the server's authority."""
    simulator = Simulator(tmp_path / "sim", secured.host, secured.mqtt_port, credentials=secured.device_jwt)
    try:
        yield simulator
    finally:
        simulator.stop_all()


def _registered(server: NatsServer, device: str) -> bool:
    return registered(server.url, device, creds=str(server.creds_file("test")))


def _seqs(server: NatsServer, device: str) -> list[int]:
    readings = asyncio.run(stored(server.url, device, creds=str(server.creds_file("test"))))
    return [r.payload["seq"] for r in readings if isinstance(r.payload, dict)]


def test_a_board_with_its_own_identity_is_registered_and_forwards_exactly_once(
    secured: NatsServer, gateway: BackgroundGateway, sim: Simulator
) -> None:
    sim.add("a1", telemetry_interval_ms=100)
    assert sim.read_settings("a1")["mqtt_user"] == "a1"
    sim.start("a1")
    wait_for(lambda: _registered(secured, "a1"), "the registry to know a1", 20)
    seqs = wait_for(lambda: s if len(s := _seqs(secured, "a1")) >= 10 else None, "ten readings", 20)
    assert seqs == list(range(len(seqs))), seqs  # in order, none lost, none twice


def test_a_board_with_another_board_s_credentials_cannot_pose_as_it(
    secured: NatsServer, gateway: BackgroundGateway, sim: Simulator
) -> None:
    # b1 connects as itself (client id and topics fleet/b1/...) but holds
    # a1's JWT: the server lets it in as a1, refuses its subscriptions to
    # b1's topics (the board says so) and drops every publish on them (a
    # denied publish is still acknowledged, so look at what arrived): no
    # presence, no readings, no registry record for b1.
    sim.add("a1", telemetry_interval_ms=100)
    sim.add("b1", telemetry_interval_ms=100, mqtt_user="b1", mqtt_password=secured.device_jwt("a1"))
    sim.start("b1")
    sim.start("a1")
    wait_for(lambda: len(_seqs(secured, "a1")) >= 5, "a1's readings", 20)
    sim.wait_for_log("b1", "link: subscription to fleet/b1/cmd refused by the broker", timeout=10)
    sim.wait_for_log("b1", "link: up", timeout=10)  # with what it was allowed: the fleet-wide topics
    assert not _registered(secured, "b1")
    assert _seqs(secured, "b1") == []


def test_a_board_without_credentials_is_refused_and_says_why(secured: NatsServer, tmp_path: Path) -> None:
    sim = Simulator(tmp_path / "sim", secured.host, secured.mqtt_port)  # no credentials given
    try:
        sim.add("c1")
        sim.start("c1")
        log = sim.wait_for_log("c1", "link: down (credentials refused by the broker", timeout=10)
        line = next(line for line in log.splitlines() if "credentials refused" in line)
        # Not hammering the server: a refusal waits far longer than a lost link.
        assert int(line.rsplit("retry in ", 1)[1].split()[0]) >= 10_000, line
    finally:
        sim.stop_all()


def test_host_clients_without_credentials_are_refused(secured: NatsServer) -> None:
    async def anonymous() -> None:
        await nats.connect(secured.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)

    with pytest.raises(Exception, match="(?i)authorization"):
        asyncio.run(anonymous())
