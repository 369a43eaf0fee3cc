"""Remote commands end to end: `fleet cmd` records, the gateway delivers over
MQTT QoS 1, the real firmware runs each command at most once and reports."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from support import GatewayThread, cut_link, wait_for, wait_registered

from fleet.cli.main import main
from fleet.client.commands import send, status
from fleet.state.commands import CommandRecord
from fleet.broker.server import NatsServer
from fleet.sim.simulator import Simulator

FAST = {"keepalive_s": 2, "reconnect_min_ms": 100, "reconnect_max_ms": 500, "socket_timeout_ms": 1000,
        "telemetry_interval_ms": 200}


@pytest.fixture
def sim(simulators: Callable[..., Simulator], gateway: GatewayThread) -> Simulator:
    return simulators(settings_defaults=FAST, fault_injection=True)


def online(sim: Simulator, server: NatsServer, device: str = "sim-001") -> None:
    sim.add(device)
    sim.start(device)
    sim.wait_for_log(device, "link: up", timeout=10)
    wait_registered(server.url, device)  # commands name devices the registry knows


def record(server: NatsServer, command_id: str) -> CommandRecord:
    return asyncio.run(status(server.url, command_id))


def final(server: NatsServer, command_id: str, timeout: float = 20) -> CommandRecord:
    return wait_for(lambda: (r := record(server, command_id)).final and r, f"command {command_id} to finish", timeout)


def publish_raw(server: NatsServer, topic: str, payloads: list[bytes]) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="tester")
    client.connect(server.host, server.mqtt_port)
    client.loop_start()
    try:
        for payload in payloads:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


def test_a_command_sent_while_offline_runs_once_on_reconnect(sim: Simulator, server: NatsServer) -> None:
    online(sim, server)
    cut_link(sim, "sim-001")
    (sent,) = asyncio.run(send(server.url, "blink", {"times": 2}, device="sim-001"))
    wait_for(lambda: record(server, sent.id).state == "sent", "the gateway to hand it to the broker", 10)
    sim.set_link("sim-001", "pass")
    done = final(server, sent.id)
    assert done.state == "succeeded" and done.result == {"times": 2}
    assert [state for state, _ in done.history] == ["queued", "sent", "delivered", "succeeded"]
    assert sim.devices["sim-001"].log_text().count(f"cmd {sent.id}: succeeded") == 1


def test_a_redelivered_command_is_not_run_twice_even_across_a_reboot(sim: Simulator, server: NatsServer) -> None:
    online(sim, server)
    message = json.dumps({"id": "c-redelivered", "name": "display", "args": {"text": "once"}, "expires": None}).encode()
    # The same message twice, as the broker does when the PUBACK was lost.
    publish_raw(server, "fleet/sim-001/cmd", [message, message])
    log = sim.wait_for_log("sim-001", "cmd c-redelivered: succeeded")
    sim.power_cycle("sim-001")
    sim.wait_for_log("sim-001", "link: up", count=2, timeout=10)
    publish_raw(server, "fleet/sim-001/cmd", [message])
    # Its stored result goes out again; wait for the board to have handled it.
    publish_raw(server, "fleet/sim-001/cmd", [b'{"id": "c-after", "name": "ping"}'])
    log = sim.wait_for_log("sim-001", "cmd c-after: succeeded")
    assert log.count("display: once") == 1 and log.count("cmd c-redelivered: succeeded") == 1


def test_reboot_reports_first_and_happens_once(sim: Simulator, server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    online(sim, server)
    capsys.readouterr()
    code = main(["cmd", "send", "sim-001", "reboot", "--wait", "--json", "--nats", server.url])
    (done,) = json.loads(capsys.readouterr().out)
    assert code == 0 and done["state"] == "succeeded" and done["result"] == "rebooting"
    log = sim.wait_for_log("sim-001", "boot 2 (soft_reset)", timeout=15)
    # Back online after its reboot, and it has handled what the broker held for it.
    (ping,) = asyncio.run(send(server.url, "ping", {}, device="sim-001", wait=15))
    assert ping.state == "succeeded"
    log = sim.devices["sim-001"].log_text()
    assert log.count("rebooting") == 1 and "boot 3" not in log


def test_an_expired_command_is_never_run(sim: Simulator, server: NatsServer) -> None:
    online(sim, server)
    cut_link(sim, "sim-001")
    (sent,) = asyncio.run(send(server.url, "blink", {"times": 1}, device="sim-001", ttl=1.0))
    done = final(server, sent.id, timeout=10)
    assert done.state == "expired"
    sim.set_link("sim-001", "pass")
    # The broker still holds it for the board, which refuses it by the clock.
    log = sim.wait_for_log("sim-001", f"cmd {sent.id}: expired", timeout=15)
    assert f"cmd {sent.id}: succeeded" not in log
    assert record(server, sent.id).state == "expired"


def test_unknown_commands_bad_arguments_and_garbage_are_rejected_and_the_board_stays_up(
    sim: Simulator, server: NatsServer
) -> None:
    online(sim, server)
    (unknown,) = asyncio.run(send(server.url, "selfdestruct", {}, device="sim-001", wait=15))
    assert unknown.state == "rejected" and "unknown command 'selfdestruct'" in (unknown.error or "")
    (bad,) = asyncio.run(send(server.url, "blink", {"times": "lots"}, device="sim-001", wait=15))
    assert bad.state == "rejected" and "times must be an integer" in (bad.error or "")
    publish_raw(server, "fleet/sim-001/cmd", [b"\x00garbage", b'{"id": 7}', b"[]", b"y" * 6000])
    log = sim.wait_for_log("sim-001", "over max_payload", timeout=10)
    assert log.count("cmd: malformed message rejected") == 3
    (ping,) = asyncio.run(send(server.url, "ping", {}, device="sim-001", wait=15))
    assert ping.state == "succeeded" and ping.result == "pong"
    assert "Traceback" not in sim.devices["sim-001"].log_text()


def test_a_fan_out_gives_each_device_its_own_command(
    sim: Simulator, server: NatsServer, gateway: GatewayThread, capsys: pytest.CaptureFixture[str]
) -> None:
    online(sim, server, "sim-001")
    online(sim, server, "sim-002")
    wait_for(lambda: gateway.gateway.config_publisher and {"sim-001", "sim-002"} <= set(gateway.gateway.config_publisher.groups),
             "both boards in the registry", 10)
    capsys.readouterr()
    code = main(["cmd", "send", "--all", "info", "--wait", "--json", "--nats", server.url])
    results: list[dict[str, Any]] = json.loads(capsys.readouterr().out)
    assert code == 0
    assert sorted(r["device"] for r in results) == ["sim-001", "sim-002"] and len({r["id"] for r in results}) == 2
    assert all(r["state"] == "succeeded" and r["result"]["id"] == r["device"] for r in results)
    code = main(["cmd", "list", "sim-002", "--json", "--nats", server.url])
    listed = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in listed] == ["info"]


def test_the_gateway_serves_commands_and_configuration_as_micro_endpoints(sim: Simulator, server: NatsServer) -> None:
    import nats

    online(sim, server)
    (done,) = asyncio.run(send(server.url, "ping", {}, device="sim-001", wait=15))

    async def ask() -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any], str]:
        nc = await nats.connect(server.url)
        try:
            one = json.loads((await nc.request("fleet-api.commands", done.id.encode(), timeout=5)).data)
            listed = json.loads((await nc.request("fleet-api.commands", b'{"device": "sim-001"}', timeout=5)).data)
            config = json.loads((await nc.request("fleet-api.config", b"sim-001", timeout=5)).data)
            missing = await nc.request("fleet-api.commands", b"c-nope", timeout=5)
            return one, listed, config, (missing.headers or {}).get("Nats-Service-Error-Code", "")
        finally:
            await nc.close()

    one, listed, config, missing_code = asyncio.run(ask())
    assert one["state"] == "succeeded" and one["result"] == "pong"
    assert [r["id"] for r in listed] == [done.id]
    assert config["device"] == "sim-001" and "desired" in config
    assert missing_code == "404"
