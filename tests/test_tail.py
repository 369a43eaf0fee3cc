"""`fleet tail` behaves like tail(1): the last readings and exit, -f to follow,
--since for a time window, --csv for spreadsheets; an unknown device is refused.

Readings go in as a board sends them: a batch on fleet.<id>.batch, captured by
FLEET_BATCHES and split into FLEET_TELEMETRY by a real gateway.
"""
from __future__ import annotations

import asyncio
import csv
import json
import os
import queue
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta
from typing import Any

import nats
import pytest
from support import GatewayThread, stored_readings, wait_for

from fleet.cli.main import main
from fleet.protocol import nats_subject
from fleet.broker.server import NatsServer


def reading(seq: int, **fields: Any) -> dict[str, Any]:
    return {"seq": seq, "boot": 1, "temp_c": 20.0 + seq, **fields}


def store(server: NatsServer, device: str, *records: dict[str, Any]) -> None:
    """Publish one batch as the board's forwarder does; return once the splitter stored it."""
    before = len(stored_readings(server.url, device))

    async def publish() -> None:
        nc = await nats.connect(server.url)
        try:
            batch = {"records": list(records), "dropped": 0, "backlog": 0}
            await nc.jetstream().publish(nats_subject(device, "batch"), json.dumps(batch).encode())
        finally:
            await nc.close()

    asyncio.run(publish())
    wait_for(lambda: len(stored_readings(server.url, device)) >= before + len(records), f"{device}'s readings", 10)


def tail(capsys: pytest.CaptureFixture[str], server: NatsServer, *argv: str) -> tuple[int, list[str], str]:
    capsys.readouterr()
    code = main(["tail", *argv, "--nats", server.url])
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), captured.err


def test_last_n_prints_exactly_n_readings_and_exits(
    server: NatsServer, gateway: GatewayThread, capsys: pytest.CaptureFixture[str]
) -> None:
    store(server, "dev-a", *(reading(seq) for seq in range(1, 13)))
    store(server, "dev-b", reading(1), reading(2))  # stored after dev-a's: must not count

    code, lines, _ = tail(capsys, server, "dev-a", "-n", "3", "--json")
    assert code == 0 and [json.loads(line)["payload"]["seq"] for line in lines] == [10, 11, 12]

    code, lines, _ = tail(capsys, server, "dev-a")  # tail(1)'s default: the last 10
    assert code == 0 and len(lines) == 10 and " dev-a " in lines[0] and "seq=3 " in lines[0]

    code, lines, _ = tail(capsys, server, "--last", "4", "--json")  # every device
    assert [(r["device"], r["payload"]["seq"]) for r in map(json.loads, lines)] == [
        ("dev-a", 11), ("dev-a", 12), ("dev-b", 1), ("dev-b", 2)
    ]


def test_since_prints_only_the_readings_stored_in_that_window(
    server: NatsServer, gateway: GatewayThread, capsys: pytest.CaptureFixture[str]
) -> None:
    store(server, "dev-a", reading(1), reading(2), reading(3))
    old = stored_readings(server.url, "dev-a")[-1].time
    # The window's edge must fall between the two batches' server timestamps.
    wait_for(lambda: time.time() > old + 0.5, "the clock to move on", 5, every=0.05)
    store(server, "dev-a", reading(4), reading(5))
    new = stored_readings(server.url, "dev-a")[-2].time
    window = f"{time.time() - (old + new) / 2:.3f}"

    code, lines, _ = tail(capsys, server, "dev-a", "--since", window, "--json")
    assert code == 0 and [json.loads(line)["payload"]["seq"] for line in lines] == [4, 5]
    code, lines, _ = tail(capsys, server, "dev-a", "--since", window, "-n", "1", "--json")
    assert [json.loads(line)["payload"]["seq"] for line in lines] == [5]
    code, lines, _ = tail(capsys, server, "dev-a", "--since", "1d", "--json")
    assert [json.loads(line)["payload"]["seq"] for line in lines] == [1, 2, 3, 4, 5]


def test_csv_has_a_header_with_every_field_and_one_row_per_reading(
    server: NatsServer, gateway: GatewayThread, capsys: pytest.CaptureFixture[str]
) -> None:
    store(server, "dev-a", reading(1, rssi=-60), reading(2, label="kitchen, north"))

    code, lines, _ = tail(capsys, server, "dev-a", "--csv")
    rows = list(csv.reader(lines))
    assert code == 0 and rows[0] == ["device", "seq", "time", "boot", "label", "rssi", "temp_c"]
    assert [row[:2] + row[3:] for row in rows[1:]] == [
        ["dev-a", "1", "1", "", "-60", "21.0"],
        ["dev-a", "2", "1", "kitchen, north", "", "22.0"],
    ]
    # ISO 8601 in UTC, to the millisecond, from the stream's timestamps.
    times = [datetime.fromisoformat(row[2]) for row in rows[1:]]
    assert all(t.utcoffset() == timedelta(0) for t in times)
    assert all(abs(t.timestamp() - r.time) < 0.001 for t, r in zip(times, stored_readings(server.url, "dev-a")))


def test_follow_prints_the_last_ten_then_new_readings_as_they_are_stored(
    server: NatsServer, gateway: GatewayThread
) -> None:
    store(server, "dev-a", *(reading(seq) for seq in range(1, 13)))
    process = subprocess.Popen(
        [sys.executable, "-m", "fleet", "tail", "dev-a", "-f", "--csv", "--nats", server.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout or ()], daemon=True).start()
    try:
        first = [next_line(lines, 15) for _ in range(11)]
        assert first[0] == "device,seq,time,boot,temp_c,extra"
        assert [row[1] for row in csv.reader(first[1:])] == [str(seq) for seq in range(3, 13)]
        # A field the header does not have goes, as JSON, into `extra`.
        store(server, "dev-a", reading(13, rssi=-70))
        row = next(csv.reader([next_line(lines, 15)]))
        assert row[:2] == ["dev-a", "13"] and row[3:5] == ["1", "33.0"] and json.loads(row[5]) == {"rssi": -70}
        assert process.poll() is None  # still following
    finally:
        process.terminate()
        process.wait(10)


def next_line(lines: queue.Queue[str], timeout: float) -> str:
    try:
        return lines.get(timeout=timeout).rstrip("\n")
    except queue.Empty:
        raise AssertionError(f"no line from `fleet tail -f` within {timeout} s") from None


def test_an_unknown_device_is_refused_in_one_line_instead_of_waiting(
    server: NatsServer, gateway: GatewayThread, capsys: pytest.CaptureFixture[str]
) -> None:
    store(server, "sim-001", reading(1))
    for argv in (["sim-999"], ["sim-999", "-f"]):
        code, lines, err = tail(capsys, server, *argv)
        assert code == 1 and lines == [] and err.count("\n") == 1, err
        assert "unknown device sim-999" in err and "`fleet devices` lists the known ones" in err


def test_no_readings_stored_prints_nothing_and_a_note(
    server: NatsServer, gateway: GatewayThread, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines, err = tail(capsys, server)
    assert code == 0 and lines == [] and err.count("\n") == 1 and "no readings stored" in err

    store(server, "dev-a", reading(1))
    code, lines, err = tail(capsys, server, "dev-a", "--since", "0.001")
    assert code == 0 and lines == [] and err == "fleet tail: no readings stored for dev-a in the last 0.001\n"
