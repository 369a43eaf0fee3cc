"""The gateway against a real nats-server, with paho-mqtt standing in for boards.

Each test is a plain function running one coroutine; every wait is a poll of
a condition with a deadline. Stand-in devices publish exactly what
firmware/device.py publishes (birth and last will on status, readings in
batches), QoS 1, status retained.
"""
from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import nats
import paho.mqtt.client as mqtt
import pytest

from fleet import __version__
from fleet.cli.main import main
from fleet.gateway.forwarding import SPLITTER_CONSUMER
from fleet.gateway.service import (
    PRESENCE_CONSUMER,
    DeviceEvent,
    Gateway,
    GatewayConfig,
    apply_events,
)
from fleet.state.inventory import ApiError, DeviceNotFound, GatewayNotRunning, fetch_device, fetch_devices
from fleet.protocol import BATCH_STREAM, PRESENCE_STREAM, TELEMETRY_STREAM, mqtt_topic, nats_subject
from fleet.broker.server import NatsServer
from fleet.wire import DeviceRecord, Presence, TelemetryReading

T = TypeVar("T")

# Short fetches keep gateway.stop() (which lets the batch in hand finish) fast.
FETCH_WAIT = 0.25


async def eventually(check: Callable[[], Awaitable[T] | T], what: str, timeout: float = 10.0) -> T:
    """Poll `check` (sync or async) until it returns something truthy; fail naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    last_problem = "never true"
    while True:
        try:
            outcome = check()
            result = await outcome if inspect.isawaitable(outcome) else outcome
            if result:
                return result
            last_problem = f"last result {result!r}"
        except (AssertionError, DeviceNotFound, GatewayNotRunning) as problem:
            last_problem = repr(problem)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}: {last_problem}")
        await asyncio.sleep(0.05)


class StandInDevice:
    """An MQTT client behaving like the fleet firmware on the wire."""

    def __init__(self, server: NatsServer, device_id: str, boots: int = 1, reset: str = "power_on") -> None:
        self.server = server
        self.id = device_id
        self.boots = boots
        self.reset = reset
        self._connected = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, clean_session=True)
        self.client.on_connect = lambda *_: self._connected.set()
        self.client.will_set(mqtt_topic(device_id, "status"), self.presence(False), qos=1, retain=True)

    def presence(self, online: bool) -> bytes:
        return json.dumps(
            {"online": online, "id": self.id, "board": "sim", "firmware": "0.1.0", "boots": self.boots, "reset": self.reset}
        ).encode()

    def connect(self) -> StandInDevice:
        self.client.connect("127.0.0.1", self.server.mqtt_port, keepalive=30)
        self.client.loop_start()
        assert self._connected.wait(10), f"{self.id} could not connect to MQTT"
        self.publish("status", self.presence(True), retain=True)
        return self

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(mqtt_topic(self.id, topic), payload, qos=1, retain=retain)
        info.wait_for_publish(10)  # PUBACK: the server has the message
        assert info.is_published(), f"{self.id}: no PUBACK for {topic}"

    def reading(self, seq: int, temp_c: float = 23.31) -> None:
        """One reading, forwarded as the firmware forwards its log: a batch."""
        record = {"seq": seq, "ts": None, "boot": self.boots, "uptime_s": seq, "heap_free": 81152, "temp_c": temp_c, "rssi": -68}
        self.publish("batch", json.dumps({"records": [record], "dropped": 0, "backlog": 0}).encode())

    def crash(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a board losing power does: the will fires."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()

    def close(self) -> None:
        self.client.loop_stop()
        try:
            self.client.disconnect()
        except Exception:
            pass


@asynccontextmanager
async def devices(server: NatsServer, *device_ids: str) -> AsyncIterator[list[StandInDevice]]:
    stand_ins = [StandInDevice(server, device_id) for device_id in device_ids]
    try:
        yield stand_ins
    finally:
        for stand_in in stand_ins:
            stand_in.close()


@asynccontextmanager
async def running_gateway(server: NatsServer, **config: Any) -> AsyncIterator[Gateway]:
    gateway = Gateway(GatewayConfig(server.url, fetch_wait=FETCH_WAIT, **config))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def record_of(server: NatsServer, device_id: str) -> DeviceRecord:
    return await fetch_device(server.url, device_id)


async def record_where(server: NatsServer, device_id: str, what: str, **expected: Any) -> DeviceRecord:
    """Wait until the registry's record for device_id has the expected field values."""

    async def matches() -> DeviceRecord | None:
        record = await record_of(server, device_id)
        return record if all(getattr(record, name) == value for name, value in expected.items()) else None

    return await eventually(matches, f"{device_id} {what} ({expected})")


def free_closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- the registry from MQTT -------------------------------------------------------------


def test_readings_over_mqtt_are_stored_and_the_registry_shows_the_device(server: NatsServer) -> None:
    async def scenario() -> None:
        async with running_gateway(server), devices(server, "dev-a") as (device,):
            before = time.time()
            device.connect()
            for seq in (1, 2, 3):
                device.reading(seq, temp_c=20.0 + seq)

            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()

                async def three_stored() -> bool:
                    info = await js.stream_info(TELEMETRY_STREAM)
                    if info.state.messages < 3:
                        return False
                    last = await js.get_last_msg(TELEMETRY_STREAM, nats_subject("dev-a", "telemetry"))
                    return info.state.messages == 3 and json.loads(last.data or b"")["seq"] == 3

                await eventually(three_stored, "three readings in FLEET_TELEMETRY")

                record = await record_where(server, "dev-a", "online with seq 3", online=True, last_seq=3)
                # The splitter told the registry which stored message the reading is.
                last = await js.get_last_msg(TELEMETRY_STREAM, nats_subject("dev-a", "telemetry"))
                assert record.telemetry_stream_seq == last.seq
                assert (record.board, record.firmware, record.boots, record.reset) == ("sim", "0.1.0", 1, "power_on")
                assert record.last_telemetry is not None and record.last_telemetry["temp_c"] == 23.0
                assert record.last_seen is not None and record.since is not None
                assert before - 1 <= record.since <= record.last_seen <= time.time() + 1
                assert record.malformed == 0
                assert [r.id for r in await fetch_devices(server.url)] == ["dev-a"]

                # Discoverable like any micro service (`nats micro list` asks the same).
                info = json.loads((await nc.request("$SRV.INFO.fleet", b"", timeout=5)).data)
                assert (info["name"], info["version"]) == ("fleet", __version__)
                endpoints = {e["name"]: e["subject"] for e in info["endpoints"]}
                assert endpoints == {
                    "devices": "fleet-api.devices", "device": "fleet-api.device", "query": "fleet-api.query",
                    "config": "fleet-api.config", "commands": "fleet-api.commands", "health": "fleet-api.health",
                    "commands-send": "fleet-api.commands.send", "config-set": "fleet-api.config.set",
                    "config-history": "fleet-api.config.history", "config-rollback": "fleet-api.config.rollback",
                }
                # Every instance answers a health request, each in its own queue group.
                health = json.loads((await nc.request("fleet-api.health", b"", timeout=5)).data)
                assert health["instance"] == info["id"] and health["nats_url"] == server.url
            finally:
                await nc.close()

    asyncio.run(scenario())


def test_abrupt_disconnect_fires_the_will_and_marks_the_device_offline(server: NatsServer) -> None:
    async def scenario() -> None:
        async with running_gateway(server), devices(server, "dev-a") as (device,):
            device.connect()
            device.reading(1)
            online = await record_where(server, "dev-a", "online", online=True, last_seq=1)

            device.crash()
            offline = await record_where(server, "dev-a", "offline after the will", online=False)
            assert online.since is not None and offline.since is not None and offline.since > online.since
            assert offline.last_seq == 1  # the reading is kept
            assert offline.last_seen == offline.since  # the will is its latest message

    asyncio.run(scenario())


def test_restarted_gateway_catches_up_with_what_happened_while_it_was_down(server: NatsServer) -> None:
    async def scenario() -> None:
        async with devices(server, "dev-a", "dev-b") as (dev_a, dev_b):
            async with running_gateway(server):
                dev_a.connect()
                await record_where(server, "dev-a", "online", online=True)

            # No gateway: the streams keep capturing on their own.
            dev_a.reading(7)
            dev_a.crash()
            dev_b.connect()
            dev_b.reading(1)

            # Restarted with other limits: the streams are updated, not refused.
            async with running_gateway(server, telemetry_max_age=3600.0, presence_history=4):
                await record_where(server, "dev-a", "offline with seq 7", online=False, last_seq=7)
                await record_where(server, "dev-b", "online with seq 1", online=True, last_seq=1)

                nc = await nats.connect(server.url)
                try:
                    js = nc.jetstream()
                    assert (await js.stream_info(TELEMETRY_STREAM)).config.max_age == 3600.0
                    assert (await js.stream_info(PRESENCE_STREAM)).config.max_msgs_per_subject == 4

                    async def all_acked() -> bool:
                        infos = [
                            await js.consumer_info(BATCH_STREAM, SPLITTER_CONSUMER),
                            await js.consumer_info(PRESENCE_STREAM, PRESENCE_CONSUMER),
                        ]
                        return all(i.num_pending == 0 and i.num_ack_pending == 0 for i in infos)

                    await eventually(all_acked, "both durable consumers caught up and acked")
                finally:
                    await nc.close()

    asyncio.run(scenario())


def test_gateway_carries_on_across_a_server_restart(server: NatsServer) -> None:
    async def scenario() -> None:
        async with running_gateway(server), devices(server, "dev-a", "dev-b") as (dev_a, dev_b):
            dev_a.connect()
            dev_a.reading(1)
            await record_where(server, "dev-a", "online with seq 1", online=True, last_seq=1)

            await asyncio.to_thread(server.restart)  # same ports, same JetStream store
            dev_b.connect()
            dev_b.reading(5)
            await record_where(server, "dev-b", "seen after the restart", online=True, last_seq=5)
            # The registry is a KV bucket in the JetStream store: it survived too.
            assert (await record_of(server, "dev-a")).last_seq == 1

    asyncio.run(scenario())


def test_two_gateways_at_once_split_the_work_without_losing_updates(server: NatsServer) -> None:
    readings, bad_payloads = 40, 5

    async def scenario() -> None:
        # Small batches so both instances get messages of the same devices.
        first = Gateway(GatewayConfig(server.url, fetch_wait=FETCH_WAIT, batch_size=4))
        runner = asyncio.create_task(first.run_forever())
        try:
            async with running_gateway(server, batch_size=4) as second, devices(server, "a", "b", "c") as stand_ins:
                await eventually(lambda: first.service_id, "the first gateway started")
                for device in stand_ins:
                    device.connect()
                for seq in range(1, readings + 1):
                    for device in stand_ins:
                        device.reading(seq)
                        if seq % (readings // bad_payloads) == 0:
                            device.publish("batch", b"{broken")

                for device in stand_ins:
                    # Every malformed payload counted once: no update lost to the other instance.
                    await record_where(server, device.id, "all readings in", online=True,
                                       last_seq=readings, malformed=bad_payloads)
                # An older batch may still be on its way after a newer one was written.
                births = len(stand_ins)
                await eventually(lambda: sum(g.counters.messages for g in (first, second)) == births,
                                 "every status message processed exactly once by one of the two")

                nc = await nats.connect(server.url)
                try:
                    inbox = nc.new_inbox()
                    pongs = await nc.subscribe(inbox)
                    await nc.publish("$SRV.PING.fleet", b"", reply=inbox)
                    ids = {json.loads((await pongs.next_msg(timeout=5)).data)["id"] for _ in range(2)}
                    assert ids == {first.service_id, second.service_id}
                finally:
                    await nc.close()
        finally:
            runner.cancel()  # run_forever stops the gateway when cancelled
            await asyncio.gather(runner, return_exceptions=True)

    asyncio.run(scenario())


def test_malformed_payloads_are_counted_and_the_gateway_keeps_working(server: NatsServer) -> None:
    bad_batches = [
        b"not json",
        b"[1, 2]",
        b'{"records": "7"}',
        b'{"records": [], "dropped": -1}',
        b'{"records": [], "prev": true}',
        b'{"records": [{"seq": 3, "temp_c": NaN}]}',
        b"\xff\xfe",
    ]
    # Bad readings inside a good batch: each counted, the good one stored.
    bad_records = [{"seq": "7"}, {"seq": True}, {"temp_c": 1.5}, [1, 2]]
    bad_status = [b'{"online": "yes"}', b'{"online": true, "id": "someone-else"}']

    async def scenario() -> None:
        async with running_gateway(server) as gateway, devices(server, "dev-a") as (device,):
            device.connect()
            for payload in bad_batches:
                device.publish("batch", payload)
            device.publish("batch", json.dumps({"records": [*bad_records, {"seq": 1}]}).encode())
            for payload in bad_status:
                device.publish("status", payload, retain=True)
            device.reading(2)
            # Not a valid device id: nowhere to count it but the gateway's counters.
            too_long = StandInDevice(server, "x" * 40)
            try:
                too_long.connect()
            finally:
                too_long.close()

            malformed = len(bad_batches) + len(bad_records) + len(bad_status)
            record = await record_where(server, "dev-a", "malformed counted", last_seq=2, malformed=malformed)
            assert record.online is True  # the bad status messages did not count as presence
            await eventually(lambda: gateway.counters.rejected == 1, "the long id rejected")
            assert gateway.counters.malformed == len(bad_status)  # the batches are the splitter's
            assert gateway.splitter is not None
            assert gateway.splitter.counters.malformed == len(bad_batches) + len(bad_records)
            assert [r.id for r in await fetch_devices(server.url)] == ["dev-a"]

            device.reading(3)  # still working
            await record_where(server, "dev-a", "a reading after the bad ones", last_seq=3)

    asyncio.run(scenario())


def test_the_retired_consumer_that_read_every_reading_is_deleted(server: NatsServer) -> None:
    # Gateways before the splitter fed the registry kept a durable consumer
    # on FLEET_TELEMETRY; left behind, the server would keep its place and
    # its pending count forever.
    async def scenario() -> None:
        async with running_gateway(server):
            pass
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await js.add_consumer(TELEMETRY_STREAM, durable_name="fleet-gateway-telemetry")
            assert (await js.stream_info(TELEMETRY_STREAM)).state.consumer_count == 1
            async with running_gateway(server):
                assert (await js.stream_info(TELEMETRY_STREAM)).state.consumer_count == 0
        finally:
            await nc.close()

    asyncio.run(scenario())


def test_unknown_device_is_404_and_an_invalid_id_400(server: NatsServer) -> None:
    async def scenario() -> None:
        async with running_gateway(server):
            with pytest.raises(DeviceNotFound) as unknown:
                await fetch_device(server.url, "ghost")
            assert unknown.value.code == 404
            with pytest.raises(ApiError) as invalid:
                await fetch_device(server.url, "not an id!")
            assert invalid.value.code == 400
            assert await fetch_devices(server.url) == []

    asyncio.run(scenario())


# -- the command line --------------------------------------------------------------


def test_cli_devices_and_tail_print_what_was_published(server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    async def scenario() -> None:
        async with running_gateway(server), devices(server, "dev-a", "dev-b") as (dev_a, dev_b):
            dev_a.connect()
            dev_b.connect()
            for seq in (1, 2, 3, 4):
                dev_a.reading(seq, temp_c=21.5)
            dev_b.reading(9)
            await record_where(server, "dev-a", "seq 4", last_seq=4)
            await record_where(server, "dev-b", "seq 9", last_seq=9)
            capsys.readouterr()

            # main() runs its own event loop, so it runs in a thread here.
            assert await asyncio.to_thread(main, ["devices", "--nats", server.url, "--json"]) == 0
            listed = json.loads(capsys.readouterr().out)
            assert [(d["id"], d["online"], d["last_seq"]) for d in listed] == [("dev-a", True, 4), ("dev-b", True, 9)]
            assert all(isinstance(d["last_seen"], float) for d in listed)

            assert await asyncio.to_thread(main, ["devices", "--nats", server.url]) == 0
            header, row_a, row_b, health = capsys.readouterr().out.splitlines()
            # Under the table, what the gateway can reach: here it was given no MQTT listener.
            assert health.startswith("gateway ") and "no MQTT listener given" in health
            assert header.split() == [
                "DEVICE", "ONLINE", "BOARD", "FIRMWARE", "BOOTS", "LAST", "SEEN", "SEQ", "TEMP", "BACKLOG", "DROPPED"
            ]
            assert row_a.split()[:5] == ["dev-a", "yes", "sim", "0.1.0", "1"]
            # The batches said nothing was waiting and nothing was dropped.
            assert row_a.split()[-5:] == ["ago", "4", "21.5", "0", "0"]

            # History: the last two readings of dev-a, although dev-b's came after them.
            argv = ["tail", "dev-a", "--nats", server.url, "--last", "2", "--count", "2", "--json"]
            assert await asyncio.to_thread(main, argv) == 0
            lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            assert [(r["device"], r["payload"]["seq"]) for r in lines] == [("dev-a", 3), ("dev-a", 4)]

            # Live: readings stored after the tail subscribed.
            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()
                consumers_before = (await js.stream_info(TELEMETRY_STREAM)).state.consumer_count
                tail = asyncio.create_task(asyncio.to_thread(
                    main, ["tail", "--nats", server.url, "--count", "3", "--json"]))

                async def tail_subscribed() -> bool:
                    info = await js.stream_info(TELEMETRY_STREAM)
                    return info.state.consumer_count > consumers_before

                await eventually(tail_subscribed, "the tail's consumer")
                dev_a.reading(5)
                dev_b.reading(10)
                # Stored by the splitter, then something that is not a
                # reading published straight to the stream's subject.
                await record_where(server, "dev-a", "seq 5", last_seq=5)
                await record_where(server, "dev-b", "seq 10", last_seq=10)
                dev_a.publish("telemetry", b"oops")
                assert await asyncio.wait_for(tail, 15) == 0
            finally:
                await nc.close()
            lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
            assert [(r["device"], r["malformed"], r["payload"]) for r in lines[2:]] == [("dev-a", True, "oops")]
            assert [(r["device"], r["payload"]["seq"]) for r in lines[:2]] == [("dev-a", 5), ("dev-b", 10)]

    asyncio.run(scenario())


def test_cli_reports_a_missing_server_or_gateway_in_one_line(server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "--nats", server.url, "--timeout", "2"]) == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "gateway is not running" in stderr

    assert main(["tail", "--nats", server.url, "--count", "1"]) == 1
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "no FLEET_TELEMETRY stream" in stderr

    unreachable = f"nats://127.0.0.1:{free_closed_port()}"
    for argv in (["devices", "--timeout", "2"], ["tail", "--count", "1"]):
        assert main([*argv, "--nats", unreachable]) == 1
        stderr = capsys.readouterr().err
        assert stderr.count("\n") == 1 and "cannot reach the NATS server" in stderr, stderr


def test_fleet_gateway_command_serves_until_sigint(server: NatsServer) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "fleet", "gateway", "--nats", server.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        asyncio.run(_answers(server))
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output.decode()
    assert b"fleet gateway running" in output and b"fleet gateway stopped" in output
    assert b"Traceback" not in output


async def _answers(server: NatsServer) -> None:
    async def gateway_answers() -> bool:
        try:
            await fetch_devices(server.url, timeout=1)
        except Exception:
            return False
        return True

    await eventually(gateway_answers, "the gateway subprocess answering", timeout=20)


# -- folding, without a server -------------------------------------------------------


def test_newer_messages_win_whatever_order_they_are_applied_in() -> None:
    online = DeviceEvent(100.0, 1, presence=Presence(online=True, board="sim", boots=2))
    reading_5 = DeviceEvent(101.0, 7, reading=TelemetryReading(5, {"seq": 5}))
    reading_6 = DeviceEvent(102.0, 8, reading=TelemetryReading(6, {"seq": 6}))
    offline = DeviceEvent(103.0, 2, presence=Presence(online=False, board="sim", boots=2))
    events = [online, reading_5, reading_6, offline]

    results = set()
    for order in itertools.permutations(events):
        record: DeviceRecord | None = None
        for event in order:  # one batch per event: the worst interleaving of two instances
            record = apply_events(record, "dev-a", [event])
        assert record is not None
        results.add(json.dumps(record.to_json(), sort_keys=True))
    (only,) = results
    final = DeviceRecord.from_json(only)
    assert (final.online, final.last_seq, final.last_seen, final.boots) == (False, 6, 103.0, 2)

    # A redelivered message changes nothing.
    assert apply_events(final, "dev-a", [offline, reading_6]) == final
