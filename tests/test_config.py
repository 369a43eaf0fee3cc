"""Configuration end to end: `fleet config` writes the KV bucket, the gateway
publishes retained MQTT, the real firmware applies, persists and reports."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import nats
import paho.mqtt.client as mqtt
import pytest
from support import GatewayThread, cut_link, wait_for

from fleet.cli.main import main
from fleet.state.config import ConfigError, parse_assignment
from fleet.client.config import get_config, set_config
from fleet.broker.server import NatsServer
from fleet.sim.simulator import Simulator

FAST = {"keepalive_s": 2, "reconnect_min_ms": 100, "reconnect_max_ms": 500, "socket_timeout_ms": 1000}


@pytest.fixture
def sim(simulators: Callable[..., Simulator], gateway: GatewayThread) -> Simulator:
    return simulators(settings_defaults=FAST, fault_injection=True)


def fleet(server: NatsServer, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["config", *argv, "--nats", server.url])
    out, err = capsys.readouterr()
    return code, out, err


def view(server: NatsServer, device: str) -> dict[str, Any]:
    return asyncio.run(get_config(server.url, device)).to_json()


def reported(server: NatsServer, device: str, version: int, status: str = "applied") -> dict[str, Any] | None:
    got = view(server, device)
    report = got["reported"] or {}
    return got if report.get("version") == version and report.get("status") == status else None


def start_online(sim: Simulator, gateway: GatewayThread, device: str = "sim-001", **settings: Any) -> None:
    sim.add(device, telemetry_interval_ms=200, **settings)
    sim.start(device)
    sim.wait_for_log(device, "link: up", timeout=10)
    # The gateway knows the board (its registry record) once its birth is in.
    wait_for(lambda: device in (gateway.gateway.config_publisher.groups if gateway.gateway.config_publisher else {}),
             "the gateway to know the board", 10)


def test_changes_made_while_offline_arrive_as_the_latest_only(
    sim: Simulator, gateway: GatewayThread, server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    start_online(sim, gateway)
    cut_link(sim, "sim-001")
    versions = []
    for assignment in ("telemetry_interval_ms=300", "led=on", "display=hello fleet"):
        code, out, err = fleet(server, capsys, "set", "sim-001", assignment, "--json")
        assert code == 0, err
        versions.append(json.loads(out)["version"])
    assert versions == sorted(versions)
    sim.set_link("sim-001", "pass")
    got = wait_for(lambda: reported(server, "sim-001", versions[-1]), "the last version applied", 20)
    assert got["in_sync"] and got["desired"]["config"] == {"telemetry_interval_ms": 300, "led": True, "display": "hello fleet"}
    log = sim.devices["sim-001"].log_text()
    assert log.count("applied") == 1 and f"config: version {versions[-1]} applied" in log
    assert "display: hello fleet" in log

    # A reboot while offline comes up with what it applied, before any connection.
    sim.kill("sim-001")
    sim.set_link("sim-001", "drop")  # reboot while offline
    sim.start("sim-001")
    log = sim.wait_for_log("sim-001", f"config: version {versions[-1]} from flash", timeout=10)
    assert log.count("display: hello fleet") == 2


def test_an_invalid_configuration_is_rejected_and_the_previous_stays(
    sim: Simulator, gateway: GatewayThread, server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    start_online(sim, gateway)
    code, out, _ = fleet(server, capsys, "set", "sim-001", "led=on", "--json")
    good = json.loads(out)["version"]
    wait_for(lambda: reported(server, "sim-001", good), "led applied", 15)

    # The CLI refuses a bad value before storing anything.
    code, _, err = fleet(server, capsys, "set", "sim-001", "telemetry_interval_ms=5")
    assert code == 2 and "telemetry_interval_ms: must be from 10 to 86400000" in err

    # Written past the CLI (another tool, an older schema): the board refuses it.
    async def put_directly() -> int:
        nc = await nats.connect(server.url)
        try:
            kv = await nc.jetstream().key_value("fleet_config")
            return await kv.put("device.sim-001", b'{"led": true, "telemetry_interval_ms": 5}')
        finally:
            await nc.close()

    bad = asyncio.run(put_directly())
    got = wait_for(lambda: reported(server, "sim-001", bad, "rejected"), "the rejection", 15)
    assert "telemetry_interval_ms: must be from 10" in got["reported"]["error"]
    assert got["reported"]["applied"] == good and not got["in_sync"]
    code, out, _ = fleet(server, capsys, "get", "sim-001")
    assert code == 0 and "REJECTED" in out and "in sync   no" in out
    assert sim.devices["sim-001"].running


def test_rollback_and_optimistic_concurrency(
    sim: Simulator, gateway: GatewayThread, server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    start_online(sim, gateway)
    _, out, _ = fleet(server, capsys, "set", "--all", "display=first", "--json")
    first = json.loads(out)["version"]
    _, out, _ = fleet(server, capsys, "set", "--all", "display=second", "--json")
    second = json.loads(out)["version"]
    wait_for(lambda: reported(server, "sim-001", second), "second applied", 15)

    code, _, err = fleet(server, capsys, "set", "--all", "display=third", "--if-version", str(first))
    assert code == 1 and f"is at version {second}, not {first}" in err

    code, out, _ = fleet(server, capsys, "history", "--all", "--json")
    assert [(h["version"], h["config"]) for h in json.loads(out)] == [(first, {"display": "first"}), (second, {"display": "second"})]

    code, out, err = fleet(server, capsys, "rollback", "--all", "--to", str(first), "--if-version", str(second), "--json")
    assert code == 0, err
    rolled = json.loads(out)
    assert rolled["version"] > second and rolled["config"] == {"display": "first"}
    wait_for(lambda: reported(server, "sim-001", rolled["version"]), "the rollback applied", 15)
    # Shown again after "second" (whether the board saw "first" the first
    # time depends on whether its link was up then: it gets only the latest).
    log = sim.devices["sim-001"].log_text()
    assert log.rindex("display: first") > log.rindex("display: second")


def test_group_and_device_levels_override_the_fleet(
    sim: Simulator, gateway: GatewayThread, server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    start_online(sim, gateway, groups=["kitchen"])
    start_online(sim, gateway, device="sim-002")
    fleet(server, capsys, "set", "--all", "log_level=warning", "display=all")
    fleet(server, capsys, "set", "--group", "kitchen", "display=kitchen")
    _, out, _ = fleet(server, capsys, "set", "sim-002", "led=on", "--json")
    mine = wait_for(lambda: (v := view(server, "sim-001"))["in_sync"] and v, "sim-001 in sync", 15)
    other = wait_for(lambda: (v := view(server, "sim-002"))["in_sync"] and v, "sim-002 in sync", 15)
    assert mine["desired"]["config"] == {"log_level": "warning", "display": "kitchen"}
    assert other["desired"]["config"] == {"log_level": "warning", "display": "all", "led": True}


def test_malformed_config_payloads_are_rejected_and_the_board_stays_up(
    sim: Simulator, gateway: GatewayThread, server: NatsServer
) -> None:
    start_online(sim, gateway)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="prankster")
    client.connect(server.host, server.mqtt_port)
    client.loop_start()
    try:
        for payload in (b"\x00\xffgarbage", b'{"version": "x"}', b"[]", b"x" * 6000):
            client.publish("fleet/sim-001/config", payload, qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()
    log = sim.wait_for_log("sim-001", "over max_payload", timeout=10)
    assert log.count("config: malformed message rejected") >= 3
    got = wait_for(lambda: (v := view(server, "sim-001"))["reported"] and v, "a report", 10)
    assert got["reported"]["status"] == "rejected"
    assert "Traceback" not in log and sim.devices["sim-001"].running
    # Still alive and well: it applies a new, valid configuration.
    level = asyncio.run(set_config(server.url, "device.sim-001", ["led=on"], None))
    wait_for(lambda: reported(server, "sim-001", level.version), "the valid one applied", 10)


def test_assignments_are_typed_by_the_schema() -> None:
    assert parse_assignment("led=on") == ("led", True)
    assert parse_assignment("telemetry_interval_ms=250") == ("telemetry_interval_ms", 250)
    assert parse_assignment("display=") == ("display", None)
    for bad, words in (("led=maybe", "led: must be true or false"), ("colour=red", "colour: unknown key"),
                       ("log_level=loud", "log_level: must be one of"), ("nokey", "expected key=value")):
        with pytest.raises(ConfigError, match=words):
            parse_assignment(bad)
