"""What the firmware and the host share, read from firmware/protocol.json.

The firmware reads the same file on the board, so topic names and the
settings schema exist once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fleet.paths import PROTOCOL_FILE
from fleet.schema import valid_id

# The host's own API subjects; never under fleet.<id>.> (the devices' space).
API_PREFIX = "fleet-api"
TELEMETRY_STREAM = "FLEET_TELEMETRY"
PRESENCE_STREAM = "FLEET_PRESENCE"
BATCH_STREAM = "FLEET_BATCHES"
DEVICES_BUCKET = "fleet_devices"
FORWARDING_BUCKET = "fleet_forwarding"
LEASE_BUCKET = "fleet_leases"
CONFIG_BUCKET = "fleet_config"
CONFIG_REPORTS_STREAM = "FLEET_CONFIG_REPORTS"
COMMANDS_BUCKET = "fleet_commands"
COMMAND_RESULTS_STREAM = "FLEET_COMMAND_RESULTS"

@dataclass(frozen=True)
class Topic:
    name: str
    sender: str  # "device" or "host"
    qos: int
    retain: bool
    about: str


@lru_cache(maxsize=1)
def protocol() -> dict[str, Any]:
    return json.loads(PROTOCOL_FILE.read_text())


def firmware_version() -> str:
    return str(protocol()["firmware"])


def topic_root() -> str:
    return str(protocol()["topic_root"])


def topics() -> dict[str, Topic]:
    return {
        name: Topic(name, spec["from"], spec["qos"], spec["retain"], spec.get("about", ""))
        for name, spec in protocol()["topics"].items()
    }


def mqtt_topic(device_id: str, name: str) -> str:
    """fleet/<id>/<name>; device_id may be the MQTT wildcard '+'."""
    if name not in protocol()["topics"]:
        raise KeyError(f"unknown topic {name!r}")
    return f"{topic_root()}/{device_id}/{name}"


def nats_subject(device_id: str, name: str) -> str:
    """The NATS subject the MQTT gateway maps a topic to: '/' becomes '.'.

    device_id may be the NATS wildcard '*'.
    """
    return mqtt_topic(device_id, name).replace("/", ".")


def device_from_subject(subject: str) -> str | None:
    """fleet.<id>.<name...> -> <id>, or None when the subject carries no valid id."""
    parts = subject.split(".")
    if len(parts) < 3 or parts[0] != topic_root() or not valid_id(parts[1]):
        return None
    return parts[1]


def is_valid_device_id(device_id: str) -> bool:
    return valid_id(device_id)


def api_subject(endpoint: str) -> str:
    return f"{API_PREFIX}.{endpoint}"


def settings_schema() -> dict[str, dict[str, Any]]:
    return dict(protocol()["settings"])
