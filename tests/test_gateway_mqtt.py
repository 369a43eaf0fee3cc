"""The gateway says when it cannot reach its MQTT listener: a warning naming
host:port and why, repeated at most once per interval, and a line when it
connects; the state is on the publisher for the health endpoint."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from support import GatewayThread, wait_for

from fleet.gateway.configpush import ConfigPublisher
from fleet.gateway.service import Gateway
from fleet.broker.server import NatsServer

USER, PASSWORD = "fleet-gw", "s3cret-pw"


class PasswordServer(NatsServer):
    """nats-server whose clients, MQTT ones included, must log in."""

    def write_config(self) -> Path:
        path = super().write_config()
        with path.open("a") as f:
            f.write(f'authorization {{ user: "{USER}", password: "{PASSWORD}" }}\n')
        return path

    @property
    def url(self) -> str:
        return f"nats://{USER}:{PASSWORD}@{self.host}:{self.port}"


@pytest.fixture
def closed_port() -> Iterator[int]:
    # Bound and not listening: a connect is refused at once, and no other
    # process can take the port while the test runs.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def gateway_on(nats_url: str, mqtt: tuple[str, int], **config: object) -> GatewayThread:
    running = GatewayThread(nats_url, mqtt=mqtt)
    running.gateway = Gateway(replace(running.gateway.config, **config))  # type: ignore[arg-type]
    return running


def publisher_of(running: GatewayThread) -> ConfigPublisher:
    assert running.gateway.config_publisher is not None
    return running.gateway.config_publisher


def mqtt_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and "MQTT listener" in r.getMessage()]


def test_a_closed_port_is_named_in_one_warning_per_interval_while_the_gateway_keeps_trying(
    server: NatsServer, closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fleet.gateway.configpush")
    with gateway_on(server.url, ("127.0.0.1", closed_port), mqtt_warn_every=60.0) as running:
        publisher = publisher_of(running)
        wait_for(lambda: publisher.mqtt_failures >= 2, "two failed connection attempts", 10, every=0.05)
        (warning,) = mqtt_lines(caplog, logging.WARNING)
        assert f"cannot reach the MQTT listener at 127.0.0.1:{closed_port} (connection refused)" in warning
        assert not publisher.mqtt_connected and publisher.mqtt_error == "connection refused"
        assert publisher.mqtt_address == f"127.0.0.1:{closed_port}"

        # Still down when the interval is over: said again.
        publisher.warn_every = 0.2
        again = wait_for(lambda: mqtt_lines(caplog, logging.WARNING)[1:], "the warning repeated", 10, every=0.05)
        assert again[0].startswith(f"still cannot reach the MQTT listener at 127.0.0.1:{closed_port} (connection refused)")
        assert not mqtt_lines(caplog, logging.INFO)


def test_the_right_port_is_logged_once_as_connected(server: NatsServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fleet.gateway.configpush")
    with gateway_on(server.url, (server.host, server.mqtt_port)) as running:
        publisher = publisher_of(running)
        wait_for(lambda: mqtt_lines(caplog, logging.INFO), "the connected line", 10, every=0.05)
        assert mqtt_lines(caplog, logging.INFO) == [f"connected to the MQTT listener at {server.host}:{server.mqtt_port}"]
        assert not mqtt_lines(caplog, logging.WARNING)
        assert publisher.mqtt_connected and publisher.mqtt_error is None and publisher.mqtt_failures == 0


def test_a_wrong_mqtt_password_is_named_and_the_cli_logs_in_with_the_one_from_the_environment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fleet.gateway.configpush")
    with PasswordServer(tmp_path / "server") as server:
        mqtt = (server.host, server.mqtt_port)
        with gateway_on(server.url, mqtt, mqtt_username=USER, mqtt_password="wrong") as running:
            publisher = publisher_of(running)
            wait_for(lambda: publisher.mqtt_failures, "a refused login", 10, every=0.05)
            (warning,) = mqtt_lines(caplog, logging.WARNING)
            assert f"at {server.host}:{server.mqtt_port} (CONNACK refused: " in warning
            assert publisher.mqtt_error in ("CONNACK refused: bad user name or password", "CONNACK refused: not authorized")
            assert "wrong" not in repr(running.gateway.config)

        log_path = tmp_path / "gateway.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "fleet", "gateway", "--nats", server.url, "--mqtt", f"{server.host}:{server.mqtt_port}",
                 "--mqtt-user", USER],
                env={**os.environ, "FLEET_MQTT_PASSWORD": PASSWORD}, stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            wait_for(lambda: "connected to the MQTT listener" in log_path.read_text(), "the CLI gateway to log in", 20)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(10)
        text = log_path.read_text()
        assert "WARNING" not in text and PASSWORD not in text, text


def test_a_listener_that_goes_away_is_warned_about_and_its_return_is_logged(
    server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fleet.gateway.configpush")
    with gateway_on(server.url, (server.host, server.mqtt_port)) as running:
        publisher = publisher_of(running)
        wait_for(lambda: publisher.mqtt_connected, "the first connection", 10, every=0.05)
        up_since = publisher.mqtt_since
        server.restart()
        wait_for(lambda: len(mqtt_lines(caplog, logging.INFO)) == 2, "the connection to come back", 20, every=0.05)
        (warning,) = mqtt_lines(caplog, logging.WARNING)
        assert warning.startswith(f"cannot reach the MQTT listener at {server.host}:{server.mqtt_port} (connection lost"), warning
        assert publisher.mqtt_connected and publisher.mqtt_error is None and publisher.mqtt_since > up_since
