"""Live queries: the filter language, and scatter-gather over ten real
firmware boards, from the CLI and through the gateway's micro endpoint."""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import nats
import pytest
from support import GatewayThread, wait_for

from fleet.cli.main import main
from fleet.state.query import QueryError, parse_filter
from fleet.broker.server import NatsServer
from fleet.sim.simulator import Simulator

BOARDS = ["pico_w", "esp32"]


@pytest.fixture(scope="module")
def fleet10(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsServer, Simulator, GatewayThread]]:
    # One fleet for the module: ten boards take a few seconds to bring up.
    base = tmp_path_factory.mktemp("query")
    server = NatsServer(base / "server")
    server.start()
    gateway = GatewayThread(server.url, mqtt=(server.host, server.mqtt_port)).__enter__()
    sim = Simulator(base / "sim", server.host, server.mqtt_port, settings_defaults={"keepalive_s": 4})
    try:
        for index in range(10):
            device = sim.add(f"sim-{index + 1:03d}", groups=["even" if index % 2 == 0 else "odd"])
            device.reports_as = BOARDS[index % 2]
            sim.start(device.device_id)
        registry_online = lambda: asyncio.run(_online(server.url)) == {f"sim-{i + 1:03d}" for i in range(10)}  # noqa: E731
        wait_for(registry_online, "ten boards online in the registry", 20)
        yield server, sim, gateway
    finally:
        sim.stop_all()
        gateway.__exit__(None, None, None)
        server.stop()


async def _online(url: str) -> set[str]:
    from fleet.state.query import online_devices

    nc = await nats.connect(url)
    try:
        return await online_devices(nc)
    finally:
        await nc.close()


def run_query(server: NatsServer, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    capsys.readouterr()
    code = main(["query", "--json", "--nats", server.url, *argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def test_filters_parse_into_the_compact_form_and_errors_point_at_the_position() -> None:
    assert parse_filter("board == pico_w and temp > 40") == ["and", ["==", "board", "pico_w"], [">", "temp_c", 40]]
    assert parse_filter("not (rssi < -80 or groups in [a, 'b c'])") == [
        "not", ["or", ["<", "rssi", -80], ["in", "groups", ["a", "b c"]]]
    ]
    assert parse_filter("  ") is None
    with pytest.raises(QueryError) as error:
        parse_filter("board == pico_w and temp >")
    assert error.value.position == len("board == pico_w and temp >")
    assert str(error.value).splitlines()[-1] == "  " + " " * error.value.position + "^"
    with pytest.raises(QueryError, match="unknown field 'colour'"):
        parse_filter("colour == red")


def test_queries_return_exactly_the_matching_boards(fleet10: Any, capsys: pytest.CaptureFixture[str]) -> None:
    server, _, _ = fleet10
    code, everyone, err = run_query(server, capsys, "--fields", "temp,board,groups")
    assert code == 0 and len(everyone) == 10 and "10 matching, 10 answered, 10 online" in err
    temps = {found["id"]: found["fields"]["temp_c"] for found in everyone}
    boards = {found["id"]: found["fields"]["board"] for found in everyone}
    # A threshold in the middle of the widest gap: the sine drift (1.5 C)
    # cannot move a board across it during the test.
    ordered = sorted(temps.values())
    low, high = max(zip(ordered, ordered[1:]), key=lambda pair: pair[1] - pair[0])
    threshold = round((low + high) / 2, 2)
    expected = {d for d in temps if boards[d] == "pico_w" and temps[d] > threshold}
    code, found, err = run_query(server, capsys, "--where", f"board == pico_w and temp > {threshold}", "--fields", "id,temp")
    assert code == 0 and {f["id"] for f in found} == expected
    assert all(set(f["fields"]) == {"id", "temp_c"} for f in found)
    code, found, _ = run_query(server, capsys, "--where", "groups in [odd] and not board == esp32")
    assert code == 0 and found == []  # every odd board is an esp32
    code, found, _ = run_query(server, capsys, "--where", "id in [sim-001, sim-004] or backlog > 1000000")
    assert sorted(f["id"] for f in found) == ["sim-001", "sim-004"]


def test_an_invalid_filter_fails_on_the_host_with_the_position(fleet10: Any, capsys: pytest.CaptureFixture[str]) -> None:
    server, _, _ = fleet10
    code, found, err = run_query(server, capsys, "--where", "temp >> 40")
    assert code == 2 and found == [] and "position 7" in err and err.rstrip().endswith("^")


def test_a_silent_board_is_reported_missing_and_the_query_ends_at_its_timeout(
    fleet10: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    server, sim, _ = fleet10
    sim.freeze("sim-007")  # connected as far as the broker knows, but silent
    try:
        started = time.monotonic()
        code, found, err = run_query(server, capsys, "--timeout", "1.5")
        elapsed = time.monotonic() - started
    finally:
        sim.thaw("sim-007")
    assert code == 0 and len(found) == 9
    assert "1 online did not answer: sim-007" in err
    assert elapsed < 10  # bounded by the timeout, never a hang


def test_the_gateway_relays_each_matching_answer_to_a_plain_nats_request(fleet10: Any) -> None:
    server, _, _ = fleet10

    async def ask() -> list[dict[str, Any]]:
        nc = await nats.connect(server.url)
        try:
            inbox = nc.new_inbox()
            answers: list[dict[str, Any]] = []
            end: list[dict[str, str]] = []

            async def collect(message: Any) -> None:
                if message.data:
                    answers.append(json.loads(message.data))
                else:  # the end marker, with the counts
                    end.append(dict(message.headers or {}))

            subscription = await nc.subscribe(inbox, cb=collect)
            await nc.publish("fleet-api.query", b'{"where": "groups in [even]", "fields": ["id"], "timeout": 1.5}', reply=inbox)
            deadline = time.monotonic() + 10
            while not end and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await subscription.unsubscribe()
            assert end and {k: v for k, v in end[0].items() if k.startswith("Fleet-")} == {
                "Fleet-Matching": "5", "Fleet-Answered": "10", "Fleet-Online": "10", "Fleet-Silent": "", "Fleet-Errors": "0",
            }
            bad = await nc.request("fleet-api.query", b"temp >", timeout=5)
            answers.append({"error": bad.headers.get("Nats-Service-Error") if bad.headers else None})
            return answers
        finally:
            await nc.close()

    answers = asyncio.run(ask())
    assert sorted(a["id"] for a in answers[:-1]) == ["sim-001", "sim-003", "sim-005", "sim-007", "sim-009"]
    assert "expected a value" in (answers[-1]["error"] or "")
