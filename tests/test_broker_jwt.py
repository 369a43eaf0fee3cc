"""Decentralized auth against the real nats-server in operator mode: host users
with .creds over NATS, devices with bearer JWTs over MQTT, revocation through
the full resolver, tenants as separate accounts."""
from __future__ import annotations

import asyncio
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import paho.mqtt.client as mqtt
import pytest
from nats.aio.client import RawCredentials
from nats.errors import Error as NatsError
from nats.errors import NoServersError
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from fleet.broker.accounts import Authority, device_permissions, push_account_jwt
from fleet.broker.jwt import (
    JwtError,
    Permissions,
    decode_jwt,
    format_creds,
    key_from_seed,
    new_account_key,
    new_user_key,
    parse_creds,
    user_jwt,
)
from fleet.broker.server import NatsServer
from support import wait_for

NOT_AUTHORIZED = 135
BAD_USER_OR_PASSWORD = 134


@dataclass
class OperatorModeServer(NatsServer):
    """NatsServer with the authority's config appended (NatsServer takes no extra config)."""

    auth_config: str = ""

    def write_config(self) -> Path:
        path = super().write_config()
        with path.open("a") as f:
            f.write(self.auth_config)
        return path


@dataclass
class Broker:
    authority: Authority
    server: OperatorModeServer

    @property
    def admin_creds(self) -> str:
        return self.authority.system_user_creds()

    def push(self, tenant: str) -> None:
        asyncio.run(push_account_jwt(self.server.url, self.admin_creds, self.authority.account_jwt(tenant)))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    authority = Authority(tmp_path / "authority")
    server = OperatorModeServer(
        tmp_path / "server", auth_config=authority.server_config_fragment(tmp_path / "server" / "resolver")
    )
    server.start()
    try:
        yield Broker(authority, server)
    finally:
        server.stop()


class Device:
    """A paho MQTT client that records what the broker answered."""

    def __init__(self, port: int, client_id: str, password: str | None, username: str | None = None) -> None:
        self.connacks: list[ReasonCode] = []
        self.subacks: list[list[ReasonCode]] = []
        self.messages: list[tuple[str, bytes]] = []
        self.disconnected_at: float | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if password is not None:
            self.client.username_pw_set(client_id if username is None else username, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self.connacks.append(reason)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: list[ReasonCode], _p: Any) -> None:
        self.subacks.append(reasons)

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.append((message.topic, bytes(message.payload)))

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, _reason: ReasonCode, _p: Any) -> None:
        if self.disconnected_at is None:
            self.disconnected_at = time.monotonic()

    def connack(self) -> ReasonCode:
        return wait_for(lambda: self.connacks[0] if self.connacks else None, "a CONNACK", 5, every=0.01)

    def connected(self) -> bool:
        return not self.connack().is_failure

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(5)

    def subscribe(self, topic: str) -> list[ReasonCode]:
        before = len(self.subacks)
        self.client.subscribe(topic, qos=1)
        return wait_for(lambda: self.subacks[before] if len(self.subacks) > before else None, "a SUBACK", 5, every=0.01)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def devices() -> Iterator[Any]:
    made: list[Device] = []

    def make(port: int, client_id: str, password: str | None, username: str | None = None) -> Device:
        device = Device(port, client_id, password, username)
        made.append(device)
        return device

    try:
        yield make
    finally:
        for device in made:
            device.close()


class Tap:
    """A NATS subscriber on its own thread and loop, collecting subjects it sees."""

    def __init__(self, url: str, creds: str, subject: str = "fleet.>") -> None:
        self.subjects: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.nc = asyncio.run_coroutine_threadsafe(self._start(url, creds, subject), self.loop).result(5)

    async def _start(self, url: str, creds: str, subject: str) -> Any:
        nc = await nats.connect(url, user_credentials=RawCredentials(creds), allow_reconnect=False)

        async def seen(msg: Any) -> None:
            self.subjects.append(msg.subject)

        await nc.subscribe(subject, cb=seen)
        await nc.flush()
        return nc

    def publish(self, subject: str, payload: bytes) -> None:
        async def send() -> None:
            await self.nc.publish(subject, payload)
            await self.nc.flush()

        asyncio.run_coroutine_threadsafe(send(), self.loop).result(5)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.nc.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def taps() -> Iterator[Any]:
    made: list[Tap] = []

    def make(url: str, creds: str, subject: str = "fleet.>") -> Tap:
        tap = Tap(url, creds, subject)
        made.append(tap)
        return tap

    try:
        yield make
    finally:
        for tap in made:
            tap.close()


def nats_refused(url: str, **options: Any) -> bool:
    async def attempt() -> bool:
        try:
            nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2, **options)
        except (NoServersError, OSError, NatsError):
            return True
        await nc.close()
        return False

    return asyncio.run(attempt())


# --- the JWT module on its own ------------------------------------------------------------


def test_jwts_round_trip_and_tampering_is_detected() -> None:
    account, user = new_account_key(), new_user_key()
    token = user_jwt(account, user.public, "gw", permissions=Permissions(pub_allow=["a.>"]), bearer_token=True)
    claims = decode_jwt(token)
    assert claims["iss"] == account.public and claims["sub"] == user.public
    assert claims["nats"]["pub"] == {"allow": ["a.>"]} and claims["nats"]["bearer_token"] is True
    assert claims["nats"]["type"] == "user" and claims["nats"]["version"] == 2
    header, body, signature = token.split(".")
    forged = body[:-2] + ("AA" if body[-2:] != "AA" else "BB")
    with pytest.raises(JwtError):
        decode_jwt(f"{header}.{forged}.{signature}")
    assert parse_creds(format_creds(token, user.seed)) == (token, user.seed)
    assert key_from_seed(user.seed) == user and user.seed not in repr(user)
    with pytest.raises(JwtError):
        user_jwt(account, user.public, "x", permissions=Permissions(pub_allow=["a"]), scoped=True)


def test_authority_keeps_secrets_private_and_reuses_them(tmp_path: Path) -> None:
    first = Authority(tmp_path / "a")
    again = Authority(tmp_path / "a")
    assert again.operator.public == first.operator.public
    assert again.account_public("fleet") == first.account_public("fleet")
    seeds = list((tmp_path / "a").rglob("*.nk"))
    assert seeds and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in seeds)
    assert first.operator.seed not in repr(first)
    template = device_permissions("d1")
    assert "fleet.d1.config.reported" in template.pub_allow and "fleet.d1.cmd" in template.sub_allow
    assert "fleet.query" in template.sub_allow and "fleet.d1.cmd" not in template.pub_allow


# --- against the server ---------------------------------------------------------------------


def test_host_user_connects_and_anonymous_is_refused(broker: Broker, devices: Any) -> None:
    creds = broker.authority.issue_user("fleet", "gateway")

    async def round_trip() -> bytes:
        nc = await nats.connect(broker.server.url, user_credentials=RawCredentials(creds), allow_reconnect=False)
        try:
            sub = await nc.subscribe("fleet-api.echo")
            await nc.publish("fleet-api.echo", b"hi")
            return (await sub.next_msg(timeout=2)).data
        finally:
            await nc.close()

    assert asyncio.run(round_trip()) == b"hi"
    assert nats_refused(broker.server.url)
    # paho reports MQTT 3.1.1's CONNACK 5 as 135 "Not authorized" (and 4 as 134).
    assert devices(broker.server.mqtt_port, "anon", None).connack().value == NOT_AUTHORIZED
    assert devices(broker.server.mqtt_port, "nobody", "not-a-jwt").connack().value == NOT_AUTHORIZED
    # A user JWT that is not a bearer token needs a nonce signature MQTT cannot carry.
    signed_only = parse_creds(creds)[0]
    assert devices(broker.server.mqtt_port, "gw", signed_only).connack().value == NOT_AUTHORIZED


def test_device_publishes_on_its_own_topics_only(broker: Broker, devices: Any, taps: Any) -> None:
    tap = taps(broker.server.url, broker.authority.issue_user("fleet", "gateway"))
    port = broker.server.mqtt_port
    d1 = devices(port, "d1", broker.authority.issue_device("fleet", "d1"))
    assert d1.connected()
    d1.publish("fleet/d2/status", b"spoofed")  # acknowledged, but dropped by the server
    d1.publish("fleet/d1/cmd", b"not mine to send")
    d1.publish("fleet/d1/status", b"online")
    wait_for(lambda: "fleet.d1.status" in tap.subjects, "d1's status to reach NATS", 5, every=0.01)
    assert tap.subjects == ["fleet.d1.status"]

    assert [r.value for r in d1.subscribe("fleet/d2/cmd")] == [0x80]
    assert not d1.subscribe("fleet/d1/cmd")[0].is_failure
    assert not d1.subscribe("fleet/query")[0].is_failure


def test_device_tokens_need_a_username_and_work_only_over_mqtt(broker: Broker, devices: Any) -> None:
    token = broker.authority.issue_device("fleet", "d1")
    assert devices(broker.server.mqtt_port, "d1", token, username="").connack().value == BAD_USER_OR_PASSWORD
    assert devices(broker.server.mqtt_port, "d1", token, username="anything").connected()
    seedless = format_creds(token, new_user_key().seed)  # bearer: the seed is never checked
    assert nats_refused(broker.server.url, user_credentials=RawCredentials(seedless))


def test_revocation_drops_the_live_connection_and_a_new_jwt_works(broker: Broker, devices: Any) -> None:
    port = broker.server.mqtt_port
    token = broker.authority.issue_device("fleet", "d1")
    d1 = devices(port, "d1", token)
    assert d1.connected()
    broker.authority.revoke("fleet", "d1")
    pushed = time.monotonic()
    broker.push("fleet")
    wait_for(lambda: d1.disconnected_at, "the revoked device to be dropped", 1, every=0.002)
    assert d1.disconnected_at is not None
    latency_ms = (d1.disconnected_at - pushed) * 1000
    print(f"revocation dropped the connection {latency_ms:.1f} ms after the push started")
    d1.close()

    # The old JWT is refused; a JWT issued afterwards (a fresh user key) is accepted.
    assert broker.authority.revoked("fleet", "d1")
    assert decode_jwt(broker.authority.account_jwt("fleet"))["nats"]["revocations"]
    assert not devices(port, "d1", token).connected()
    fresh = broker.authority.issue_device("fleet", "d1")
    assert devices(port, "d1", fresh).connected()


def test_revoked_jwt_reconnect_is_refused_also_after_restart(broker: Broker, devices: Any, tmp_path: Path) -> None:
    port = broker.server.mqtt_port
    token = broker.authority.issue_device("fleet", "d1")
    assert devices(port, "d1", token).connected()
    broker.authority.revoke("fleet", "d1")
    broker.push("fleet")
    assert not devices(port, "d1", token).connected()

    # Same config as before the revocation (its preload is older): the resolver's
    # folder kept the newer account JWT.
    broker.server.restart()
    assert not devices(broker.server.mqtt_port, "d1", token).connected()
    # And the authority, reloaded from its folder, still carries it.
    reloaded = Authority(tmp_path / "authority")
    assert reloaded.revoked("fleet", "d1")


def test_tenants_are_isolated(broker: Broker, devices: Any, taps: Any) -> None:
    broker.authority.add_tenant("acme")
    broker.push("acme")
    port = broker.server.mqtt_port
    fleet_tap = taps(broker.server.url, broker.authority.issue_user("fleet", "gateway"))
    acme_tap = taps(broker.server.url, broker.authority.issue_user("acme", "gateway"))
    ours = devices(port, "d1", broker.authority.issue_device("fleet", "d1"))
    theirs = devices(port, "d1-acme", broker.authority.issue_device("acme", "d1"), username="d1")
    assert ours.connected() and theirs.connected()
    assert not theirs.subscribe("fleet/d1/cmd")[0].is_failure  # its own d1, in its own account
    theirs.publish("fleet/d1/status", b"acme")
    wait_for(lambda: acme_tap.subjects, "acme's d1 status in acme", 5, every=0.01)
    ours.publish("fleet/d1/status", b"fleet")
    wait_for(lambda: fleet_tap.subjects, "fleet's d1 status in fleet", 5, every=0.01)
    assert fleet_tap.subjects == ["fleet.d1.status"] and acme_tap.subjects == ["fleet.d1.status"]

    # A command for fleet's d1 reaches fleet's d1 only.
    assert not ours.subscribe("fleet/d1/cmd")[0].is_failure
    fleet_tap.publish("fleet.d1.cmd", b"reboot")
    wait_for(lambda: ours.messages, "fleet's d1 to get its command", 5, every=0.01)
    assert ours.messages == [("fleet/d1/cmd", b"reboot")] and theirs.messages == []


def test_expired_jwt_is_refused(broker: Broker, devices: Any) -> None:
    expired = broker.authority.issue_device("fleet", "d1", expires=int(time.time()) - 1)
    assert not devices(broker.server.mqtt_port, "d1", expired).connected()
    creds = broker.authority.issue_user("fleet", "old", expires=int(time.time()) - 1)
    assert nats_refused(broker.server.url, user_credentials=RawCredentials(creds))


def test_host_user_with_permissions_is_held_to_them(broker: Broker, taps: Any) -> None:
    everything = taps(broker.server.url, broker.authority.issue_user("fleet", "observer"))
    commands_only = broker.authority.issue_user("fleet", "cli", Permissions(pub_allow=["fleet.*.cmd"]))
    claims = decode_jwt(parse_creds(commands_only)[0])
    assert claims["nats"]["pub"] == {"allow": ["fleet.*.cmd"]} and claims["nats"]["issuer_account"]
    cli = taps(broker.server.url, commands_only, subject="fleet-api.unused")
    cli.publish("fleet.d1.status", b"not allowed")
    cli.publish("fleet.d1.cmd", b"allowed")
    wait_for(lambda: "fleet.d1.cmd" in everything.subjects, "the allowed command", 5, every=0.01)
    assert everything.subjects == ["fleet.d1.cmd"]
