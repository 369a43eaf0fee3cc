"""The fleet API's writing endpoints, asked as any NATS client would: the
CLI's checks, one-sentence errors with micro error codes."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import nats
import pytest
from support import GatewayThread
from test_cli_errors import put_record

from fleet.broker.server import NatsServer
from fleet.wire import DeviceRecord


def ask(server: NatsServer, subject: str, body: Any) -> tuple[str | None, Any]:
    """(error code or None, decoded reply or the error's description)."""
    async def request() -> tuple[str | None, Any]:
        nc = await nats.connect(server.url)
        try:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            reply = await nc.request(subject, data, timeout=5)
        finally:
            await nc.close()
        headers = reply.headers or {}
        if "Nats-Service-Error-Code" in headers:
            return headers["Nats-Service-Error-Code"], headers.get("Nats-Service-Error")
        return None, json.loads(reply.data)

    return asyncio.run(request())


@pytest.fixture
def known(server: NatsServer, gateway: GatewayThread) -> NatsServer:
    put_record(server, DeviceRecord(id="sim-001", online=False, groups=["lab"]))
    return server


def test_a_command_is_sent_with_the_cli_checks(known: NatsServer) -> None:
    code, records = ask(known, "fleet-api.commands.send", {"device": "sim-001", "name": "blink", "args": {"times": 2}, "ttl": "5m"})
    assert code is None and [(r["device"], r["name"], r["args"]) for r in records] == [("sim-001", "blink", {"times": 2})]
    assert records[0]["expires"] - records[0]["created"] == pytest.approx(300, abs=1)
    code, records = ask(known, "fleet-api.commands.send", {"group": "lab", "name": "ping"})
    assert code is None and [r["device"] for r in records] == ["sim-001"]

    assert ask(known, "fleet-api.commands.send", b"not json")[0] == "400"
    assert ask(known, "fleet-api.commands.send", {"device": "sim-001", "name": "x", "args": [1]}) == (
        "400", '"args" must be a JSON object')
    assert ask(known, "fleet-api.commands.send", {"device": "sim-001", "name": "x", "ttl": "5x"})[0] == "400"
    assert ask(known, "fleet-api.commands.send", {"device": "sim-001", "all": True, "name": "x"})[0] == "400"
    code, why = ask(known, "fleet-api.commands.send", {"device": "sim-999", "name": "ping"})
    assert code == "404" and "unknown device sim-999" in why
    code, records = ask(known, "fleet-api.commands.send", {"device": "sim-999", "name": "ping", "force": True})
    assert code is None and records[0]["state"] in ("queued", "sent")


def test_configuration_is_set_listed_and_rolled_back(known: NatsServer) -> None:
    code, level = ask(known, "fleet-api.config.set", {"device": "sim-001", "set": {"led": True, "log_level": "debug"}})
    assert code is None and level["config"] == {"led": True, "log_level": "debug"}
    first = level["version"]
    code, level = ask(known, "fleet-api.config.set", {"device": "sim-001", "remove": ["log_level"], "if_version": first})
    assert code is None and level["config"] == {"led": True}

    code, why = ask(known, "fleet-api.config.set", {"device": "sim-001", "set": {"led": False}, "if_version": first})
    assert code == "409" and f"not {first}" in why
    code, why = ask(known, "fleet-api.config.set", {"device": "sim-001", "set": {"telemetry_interval_ms": 5}})
    assert code == "400" and "telemetry_interval_ms: must be from 10 to 86400000" in why
    assert ask(known, "fleet-api.config.set", {"device": "sim-999", "set": {"led": True}})[0] == "404"
    assert ask(known, "fleet-api.config.set", {"all": True})[0] == "400"

    code, levels = ask(known, "fleet-api.config.history", {"device": "sim-001"})
    assert code is None and [lv["version"] for lv in levels][-1] > first
    code, level = ask(known, "fleet-api.config.rollback", {"device": "sim-001", "to": first})
    assert code is None and level["config"] == {"led": True, "log_level": "debug"}


def test_every_gateway_answers_health(server: NatsServer) -> None:
    with GatewayThread(server.url, mqtt=(server.host, server.mqtt_port)), GatewayThread(server.url):
        async def collect() -> list[dict[str, Any]]:
            from fleet.state.inventory import fetch_health_over

            nc = await nats.connect(server.url)
            try:
                return await fetch_health_over(nc, 2.0)
            finally:
                await nc.close()

        answers = asyncio.run(collect())
    assert len(answers) == 2 and len({a["instance"] for a in answers}) == 2
    mqtt = sorted((a["mqtt"] is None, a["mqtt"] and a["mqtt"]["address"]) for a in answers)
    assert mqtt == [(False, f"{server.host}:{server.mqtt_port}"), (True, None)]
