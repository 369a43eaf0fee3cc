from __future__ import annotations

import socket

from fleet.broker.server import NatsServer


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_server_listens_for_nats_and_mqtt_on_free_loopback_ports(server: NatsServer) -> None:
    assert server.port > 0 and server.mqtt_port > 0
    assert _accepts(server.port)
    assert _accepts(server.mqtt_port)
    config = server.config_path.read_text()
    assert "jetstream" in config and "mqtt" in config and "127.0.0.1" in config


def test_restart_keeps_ports_and_stop_leaves_no_process(server: NatsServer) -> None:
    port, mqtt_port = server.port, server.mqtt_port
    server.restart()
    assert (server.port, server.mqtt_port) == (port, mqtt_port)
    assert _accepts(mqtt_port)
    process = server.process
    server.stop()
    assert process is not None and process.poll() is not None
    assert not _accepts(port)
