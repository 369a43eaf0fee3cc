"""Whatever anyone publishes on a board's topics, the board stays connected
and keeps working; a cleared retained configuration is put back by the
gateway; the registry shows the configuration version in force.

The messages go through the real `mosquitto_pub` (Debian's mosquitto-clients,
installed by `make setup`), as someone at a shell would send them."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import nats
import paho.mqtt.client as mqtt
import pytest
from support import GatewayThread, wait_for

from fleet.client.config import set_config
from fleet.state.inventory import fetch_devices
from fleet.broker.server import NatsServer
from fleet.sim.simulator import Simulator
from fleet.wire import DeviceRecord

MOSQUITTO_PUB = shutil.which("mosquitto_pub")
MOSQUITTO_SUB = shutil.which("mosquitto_sub")
pytestmark = pytest.mark.skipif(
    MOSQUITTO_PUB is None or MOSQUITTO_SUB is None,
    reason="mosquitto_pub/mosquitto_sub not installed (Debian: apt-get install mosquitto-clients; `make setup` does it)",
)

DEVICE = "sim-001"
SETTINGS = {"keepalive_s": 10, "reconnect_min_ms": 100, "reconnect_max_ms": 500, "socket_timeout_ms": 2000}
BOARD_MAX = 4096  # the max_payload setting's default: larger payloads are drained, not kept
# nats-server turns an MQTT publish into a NATS message with this header
# ("NATS/1.0", "Nmqtt-Pub:<qos>"), which counts against its max_payload.
MQTT_HEADER = len(b"NATS/1.0\r\nNmqtt-Pub:0\r\n\r\n")

# Every topic the board subscribes to (firmware/device.py, Device.__init__),
# with the QoS it subscribes at.
TOPICS = {
    f"fleet/{DEVICE}/ping": 0,
    f"fleet/{DEVICE}/ack": 0,
    f"fleet/{DEVICE}/config": 0,
    f"fleet/{DEVICE}/cmd": 1,
    f"fleet/{DEVICE}/display": 0,
    "fleet/query": 0,
    "fleet/display": 0,
}
# Well-formed JSON of the wrong shape or types, per topic (never a valid
# message: a valid ack or configuration would change what the board does).
WRONG_TYPES: dict[str, list[bytes]] = {
    "ping": [b"\x00" * 10],
    "ack": [b"-5", b"12.5", b'"7"', b"1e3", b"[3]", b" "],
    "config": [
        b"[]", b'"text"', b"null", b"42", b'{"version": "7", "config": {}}', b'{"version": true, "config": {}}',
        b'{"version": 7, "config": [1]}', b'{"version": 7, "config": {"led": "yes", "telemetry_interval_ms": "fast"}}',
        b'{"version": 7}', b'{"version": -3, "config": {}}', b'{"version": 1.5, "config": {}}',
        b'{"version": 7, "config": {"display": 5, "log_level": []}}',
    ],
    "cmd": [
        b"[]", b"null", b'{"id": 5, "name": "ping"}', b'{"id": "h1", "name": 7}', b'{"id": "h2", "name": "ping", "args": [1]}',
        b'{"id": "h3", "name": "blink", "args": {"times": "many"}}', b'{"id": "h4", "name": "display", "args": {"text": 12}}',
        b'{"id": "h5", "name": "nope"}', b'{"id": "h6", "name": "ping", "expires": "soon"}',
        b'{"id": "' + b"x" * 100 + b'", "name": "ping"}', b'{"id": "", "name": "info"}',
    ],
    "query": [
        b"[]", b'{"q": 5}', b'{"q": "x", "where": "board == sim"}', b'{"q": "x", "where": ["nope", 1]}',
        b'{"q": "x", "fields": "id"}', b'{"q": "x", "fields": [1, null, {}]}',
        b'{"q": "x", "where": ' + b'["not", ' * 100 + b'["==", "id", 1]' + b"]" * 100 + b"}",
    ],
    "display": [b"\x00\x01\x1b[2J\x7f", "ünïcødé ☃ 😀".encode(), b"\xf0\x28\x8c\x28\xc3", b"\n" * 300],
}


def wrong_types(topic: str) -> list[bytes]:
    return WRONG_TYPES[topic.rsplit("/", 1)[-1]]


class Listener:
    """An MQTT client collecting what the board says on the given topics."""

    def __init__(self, server: NatsServer, topics: list[str]) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hostile-test-listener")
        self.client.on_message = lambda c, u, m: self._keep(m.topic, bytes(m.payload))
        self.client.connect(server.host, server.mqtt_port)
        self.client.loop_start()
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        # Its PUBACK comes after the broker has handled the SUBSCRIBEs before it.
        self.client.publish("hostile-test/ready", b"", qos=1).wait_for_publish(5)

    def _keep(self, topic: str, payload: bytes) -> None:
        with self.lock:
            self.got.append((topic, payload))

    def payloads(self, topic: str) -> list[bytes]:
        with self.lock:
            return [payload for t, payload in self.got if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def board(simulators: Callable[..., Simulator], gateway: GatewayThread, server: NatsServer) -> Iterator[Simulator]:
    sim = simulators(settings_defaults=SETTINGS)
    sim.add(DEVICE, telemetry_interval_ms=500)
    sim.start(DEVICE)
    sim.wait_for_log(DEVICE, "link: up", timeout=10)
    wait_for(lambda: (record := registry(server)) is not None and record.online, "the registry to show the board online", 10)
    yield sim


def registry(server: NatsServer) -> DeviceRecord | None:
    records = asyncio.run(fetch_devices(server.url))
    return next((record for record in records if record.id == DEVICE), None)


def mosquitto_pub(server: NatsServer, topic: str, payload: bytes | None, *options: str, folder: Path) -> None:
    """One message through the real client; None: an empty payload (-n)."""
    command = [MOSQUITTO_PUB or "mosquitto_pub", "-h", server.host, "-p", str(server.mqtt_port), "-t", topic, *options]
    if payload is None:
        command.append("-n")
    else:
        path = folder / "payload"
        path.write_bytes(payload)  # -f: any bytes, NUL included, of any size
        command += ["-f", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, (command[:8], result.stderr)


def listener_max(server: NatsServer) -> int:
    async def ask() -> int:
        nc = await nats.connect(server.url)
        try:
            return int(nc.max_payload)
        finally:
            await nc.close()

    return asyncio.run(ask()) - MQTT_HEADER


def test_the_board_survives_any_payload_on_every_topic_it_subscribes_to(
    board: Simulator, server: NatsServer, tmp_path: Path
) -> None:
    before = registry(server)
    assert before is not None
    largest = listener_max(server)
    common: list[tuple[bytes | None, tuple[str, ...]]] = [
        (None, ()),  # empty
        (None, ("-r",)),  # empty retained: clears a retained message
        (b"y" * BOARD_MAX, ()),  # as large as the board takes
        (b"x" * (64 * 1024), ()),
        (b"z" * largest, ()),  # as large as the MQTT listener takes
        (bytes(range(256)) * 4, ()),  # binary: NUL, control bytes, not UTF-8
        (b'{"version": 3, "config": {"led": tr', ()),  # malformed JSON
        (b"[" * 3000, ()),  # nested deeper than any parser's stack
        (b"{" * 2000 + b"\xff", ()),
    ]
    listener = Listener(server, [f"fleet/{DEVICE}/pong", f"fleet/{DEVICE}/cmd/result"])
    try:
        syncs = 0

        def handled(what: str) -> None:
            # The board handles its messages in order: once a ping sent
            # after them is answered, they have all been dealt with.
            nonlocal syncs
            syncs += 1
            token = f"sync-{syncs}".encode()
            listener.client.publish(f"fleet/{DEVICE}/ping", token)

            def answered() -> bool:
                if "link: down" in board.devices[DEVICE].log_text():
                    raise AssertionError(f"the board dropped its link after {what}")
                return token in listener.payloads(f"fleet/{DEVICE}/pong")

            wait_for(answered, f"the pong after {what}", 10, every=0.01)

        oversize = 0
        for topic, qos in TOPICS.items():
            for payload, options in common + [(p, ()) for p in wrong_types(topic)]:
                for q in sorted({0, qos}):  # a QoS 1 subscription also gets QoS 1 messages
                    mosquitto_pub(server, topic, payload, "-q", str(q), *options, folder=tmp_path)
                    shown = "nothing" if payload is None else f"{len(payload)} bytes {payload[:24]!r}"
                    handled(f"{shown} on {topic} (QoS {q}{', retained' if options else ''})")
                    if payload is not None and len(payload) > BOARD_MAX and not topic.endswith("/ack"):
                        oversize += 1

        # Still the same connection, and every message reached the board.
        log = board.devices[DEVICE].log_text()
        assert "link: down" not in log and log.count("link: up") == 1, log[-3000:]
        assert log.count("is over max_payload") == oversize, log[-3000:]
        # (A JSON nesting deeper than the heap is a MemoryError, rejected like any other malformed message.)
        for trouble in ("Traceback", "stopped:", "firmware error", "failed:"):
            assert trouble not in log, (trouble, log[-3000:])
        assert "config: none pushed (retained copy cleared)" in log

        # And it still works: a command, the display.
        mosquitto_pub(server, f"fleet/{DEVICE}/cmd", b'{"id": "after-hostile", "name": "ping"}', "-q", "1", folder=tmp_path)
        wait_for(lambda: any(json.loads(p).get("status") == "succeeded" and json.loads(p).get("id") == "after-hostile"
                             for p in listener.payloads(f"fleet/{DEVICE}/cmd/result")), "the command's result", 10)
        mosquitto_pub(server, f"fleet/{DEVICE}/display", b"still here", folder=tmp_path)
        board.wait_for_log(DEVICE, "display: still here", timeout=10)
    finally:
        listener.close()
    after = registry(server)
    assert after is not None and after.online and after.since == before.since, (before, after)
    assert "link: down" not in board.devices[DEVICE].log_text()


def set_level(server: NatsServer, assignment: str) -> int:
    return asyncio.run(set_config(server.url, f"device.{DEVICE}", [assignment], None)).version


def retained_config(server: NatsServer) -> bytes:
    """The retained message on the board's config topic, or b"" if none comes within 5 s."""
    result = subprocess.run(
        [MOSQUITTO_SUB or "mosquitto_sub", "-h", server.host, "-p", str(server.mqtt_port), "-t", f"fleet/{DEVICE}/config",
         "-C", "1", "-W", "5", "-N"],
        capture_output=True, timeout=15,
    )
    return result.stdout


def test_the_registry_shows_the_configuration_version_applied_after_connect(board: Simulator, server: NatsServer) -> None:
    record = registry(server)
    assert record is not None and not record.config_version  # nothing pushed before it connected
    version = set_level(server, "led=on")
    board.wait_for_log(DEVICE, f"config: version {version} applied", timeout=10)
    wait_for(lambda: (r := registry(server)) is not None and r.config_version == version and r,
             f"the registry to show config version {version}", 10)
    after = registry(server)
    assert after is not None and after.online and after.since == record.since  # the same session, said again


def test_a_cleared_retained_configuration_stays_in_force_and_the_gateway_publishes_it_again(
    board: Simulator, server: NatsServer, gateway: GatewayThread, tmp_path: Path
) -> None:
    version = set_level(server, "display=kept")
    board.wait_for_log(DEVICE, f"config: version {version} applied", timeout=10)
    publisher = gateway.gateway.config_publisher
    assert publisher is not None
    wanted = publisher.effective(DEVICE).payload()
    assert retained_config(server) == wanted

    mosquitto_pub(server, f"fleet/{DEVICE}/config", None, "-r", "-q", "1", folder=tmp_path)
    board.wait_for_log(DEVICE, f"config: none pushed (retained copy cleared); version {version} stays in force", timeout=10)
    assert retained_config(server) == wanted  # published again (or on its way: mosquitto_sub waits for it)
    assert publisher.republished == 1
    # Not taken for a malformed message, and what is in force was not applied again.
    log = board.devices[DEVICE].log_text()
    assert "rejected" not in log, log[-2000:]
    assert log.count(f"config: version {version} applied") == 1 and log.count("display: kept") == 1, log[-2000:]

    # A stale or foreign retained copy is replaced too, and the gateway's own echo is left alone.
    mosquitto_pub(server, f"fleet/{DEVICE}/config", b'{"version": 1, "config": {}}', "-r", "-q", "1", folder=tmp_path)
    wait_for(lambda: publisher.republished >= 2, "the gateway to replace the stale copy", 10, every=0.05)
    assert retained_config(server) == wanted
    assert publisher.republished == 2  # its own copies, echoed back to it, were left alone
