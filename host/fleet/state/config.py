"""Desired configuration: three levels in a KV bucket with history, merged
into each device's effective configuration.

Keys in the bucket `fleet_config` (history 64 revisions per key):

    fleet            the whole fleet
    group.<name>     every device whose settings list the group
    device.<id>      one device

Each value is a JSON object of configuration keys (firmware/protocol.json
"config", the same schema the board checks). The effective configuration is
fleet, then the device's groups in the order its settings list them, then
the device: later levels override earlier ones. Its version is the highest
KV revision among the levels that exist for the device; revisions only grow
across the bucket, so any change (a rollback included) gives a new version.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from fleet.broker.jetstream import ensure_bucket, key_history
from fleet.errors import UsageError
from fleet.protocol import CONFIG_BUCKET, CONFIG_REPORTS_STREAM, DEVICES_BUCKET, is_valid_device_id, nats_subject, protocol
from fleet.schema import id_problem, parse_value, problem
from fleet.wire import DeviceRecord

CONFIG_HISTORY = 64


class ConfigError(UsageError):
    """A configuration the board would reject, or a bad request; args[0] says why."""


class VersionConflict(ConfigError):
    """--if-version did not match the level's current version."""

    exit_code = 1


def config_schema() -> dict[str, dict[str, Any]]:
    return dict(protocol()["config"])


def check_value(key: str, value: Any) -> None:
    """Raise ConfigError unless the board would accept `value` for `key`
    (the same rules as firmware/rules.py check)."""
    schema = config_schema()
    if key not in schema:
        raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(schema))})")
    wrong = problem(schema[key], value)
    if wrong:
        raise ConfigError(f"{key}: {wrong}")


def parse_assignment(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, typed value); 'key=' removes the key (None)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{text!r}: expected key=value")
    schema = config_schema()
    if key not in schema:
        raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(schema))})")
    if raw == "":
        return key, None
    try:
        value = parse_value(schema[key], raw)
    except ValueError as error:
        raise ConfigError(f"{key}: {error}") from None
    check_value(key, value)
    return key, value


def level_key(device: str | None = None, group: str | None = None) -> str:
    """The bucket key of one level: exactly one of device, group, or neither (the fleet)."""
    if device is not None and group is not None:
        raise ConfigError("a level is a device or a group, not both")
    name = device if device is not None else group
    if name is not None and (problem := id_problem(name, "name")):
        raise ConfigError(problem)
    if device is not None:
        return f"device.{device}"
    if group is not None:
        return f"group.{group}"
    return "fleet"


def levels_of(device_id: str, groups: list[str]) -> list[str]:
    """The bucket keys that make a device's configuration, lowest first."""
    return ["fleet", *(f"group.{g}" for g in groups if is_valid_device_id(g)), f"device.{device_id}"]


def describe_level(key: str) -> str:
    kind, _, name = key.partition(".")
    return {"fleet": "the fleet", "group": f"group {name}", "device": f"device {name}"}[kind]


@dataclass(frozen=True)
class Level:
    key: str
    values: dict[str, Any]
    version: int  # KV revision; 0 when the level was never set
    time: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"level": self.key, "version": self.version, "time": self.time, "config": self.values}


@dataclass(frozen=True)
class Effective:
    version: int
    values: dict[str, Any]
    levels: tuple[Level, ...]

    def payload(self) -> bytes:
        """What the board receives on fleet/<id>/config."""
        return json.dumps({"version": self.version, "config": self.values}, separators=(",", ":")).encode()


def merge(levels: list[Level]) -> Effective:
    values: dict[str, Any] = {}
    for level in levels:
        values.update(level.values)
    return Effective(max((level.version for level in levels), default=0), values, tuple(levels))


def _decode(data: bytes | None) -> dict[str, Any]:
    try:
        value = json.loads(data or b"{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


async def config_bucket(js: JetStreamContext) -> KeyValue:
    return await ensure_bucket(
        js, CONFIG_BUCKET, "desired configuration: fleet, group.<g>, device.<id>", history=CONFIG_HISTORY
    )


class ConfigStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def level(self, key: str) -> Level:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return Level(key, {}, 0)
        return Level(key, _decode(entry.value), entry.revision or 0)

    async def effective(self, device_id: str, groups: list[str]) -> Effective:
        levels = [await self.level(key) for key in levels_of(device_id, groups)]
        return merge([level for level in levels if level.version])

    async def set(self, key: str, changes: dict[str, Any], if_version: int | None = None) -> Level:
        """Apply changes (None removes a key) to one level; returns the new level.

        Without if_version the read-modify-write is still atomic (retried on
        a concurrent write); with it, a level changed since that version is
        refused with VersionConflict.
        """
        for name, value in changes.items():
            if value is not None:
                check_value(name, value)
        for _ in range(20):
            current = await self.level(key)
            if if_version is not None and current.version != if_version:
                raise VersionConflict(
                    f"{describe_level(key)} is at version {current.version}, not {if_version}: read it again"
                )
            values = dict(current.values)
            for name, value in changes.items():
                if value is None:
                    values.pop(name, None)
                else:
                    values[name] = value
            data = json.dumps(values, sort_keys=True).encode()
            try:
                revision = (
                    await self.kv.create(key, data)
                    if current.version == 0
                    else await self.kv.update(key, data, last=current.version)
                )
                return Level(key, values, revision)
            except KeyWrongLastSequenceError:
                if if_version is not None:
                    raise VersionConflict(f"{describe_level(key)} changed meanwhile: read it again") from None
        raise ConfigError(f"{describe_level(key)}: too many concurrent writes")

    async def history(self, key: str) -> list[Level]:
        return [
            Level(key, _decode(message.data), message.seq or 0, _message_time(message.time))
            for message in await key_history(self.kv, key)
            if not (message.headers or {}).get("KV-Operation")  # puts only: deletes and purges have no config
        ]

    async def rollback(self, key: str, version: int, if_version: int | None = None) -> Level:
        """Write the content of an earlier version as a new version."""
        old = next((level for level in await self.history(key) if level.version == version), None)
        if old is None:
            raise ConfigError(f"{describe_level(key)} has no version {version} in its history")
        current = await self.level(key)
        removals = {name: None for name in current.values if name not in old.values}
        return await self.set(key, {**removals, **old.values}, if_version=if_version)


def _message_time(stamp: Any) -> float | None:
    """The JetStream timestamp of a revision ("2026-11-26T12:00:01.123456789Z"), in unix seconds."""
    if isinstance(stamp, datetime):
        return stamp.timestamp()
    if not isinstance(stamp, str):
        return None
    found = re.fullmatch(r"(.*?T\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", stamp)
    if not found:
        return None
    fraction = (found.group(2) or ".0")[:7]  # datetime takes microseconds, JetStream gives nanoseconds
    zone = "+00:00" if found.group(3) == "Z" else found.group(3)
    return datetime.fromisoformat(found.group(1) + fraction + zone).timestamp()


__all__ = [
    "ConfigView",
    "config_view",
    "CONFIG_HISTORY",
    "ConfigError",
    "ConfigStore",
    "Effective",
    "Level",
    "VersionConflict",
    "check_value",
    "config_bucket",
    "config_schema",
    "describe_level",
    "level_key",
    "levels_of",
    "merge",
    "parse_assignment",
]


@dataclass(frozen=True)
class ConfigView:
    """`fleet config get`: what is desired, what the board reported, in sync or not."""

    device: str
    groups: list[str]
    desired: Effective
    reported: dict[str, Any] | None

    @property
    def in_sync(self) -> bool:
        reported = self.reported or {}
        if self.desired.version == 0:
            return not reported or reported.get("applied") in (0, None)
        return reported.get("applied") == self.desired.version and reported.get("status") == "applied"

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "groups": self.groups,
            "desired": {
                "version": self.desired.version,
                "config": self.desired.values,
                "levels": [level.to_json() for level in self.desired.levels],
            },
            "reported": self.reported,
            "in_sync": self.in_sync,
        }

    def format(self) -> str:
        lines = [f"device {self.device}" + (f" (groups: {', '.join(self.groups)})" if self.groups else "")]
        sources = ", ".join(f"{describe_level(level.key)} v{level.version}" for level in self.desired.levels)
        lines.append(f"desired   version {self.desired.version}: {json.dumps(self.desired.values, sort_keys=True)}")
        if sources:
            lines.append(f"          from {sources}")
        reported = self.reported
        if reported is None:
            lines.append("reported  nothing yet")
        elif reported.get("status") == "rejected":
            lines.append(
                f"reported  version {reported.get('version')} REJECTED: {reported.get('error')}"
                f" (in force: version {reported.get('applied')})"
            )
        else:
            note = f" ({reported['error']})" if reported.get("error") else ""
            lines.append(f"reported  version {reported.get('applied')} applied{note}")
        lines.append(f"in sync   {'yes' if self.in_sync else 'no'}")
        return "\n".join(lines)


async def config_view(nc: Any, device: str, timeout: float = 5.0) -> ConfigView:
    """Desired, reported and in sync for one device, over an open connection."""
    level_key(device=device)  # validates the id
    js = nc.jetstream(timeout=timeout)
    store = ConfigStore(await config_bucket(js))
    groups: list[str] = []
    try:
        devices = await js.key_value(DEVICES_BUCKET)
        groups = DeviceRecord.from_json((await devices.get(device)).value or b"").groups
    except (KeyNotFoundError, NotFoundError, ValueError):
        pass  # never seen: no groups known
    desired = await store.effective(device, groups)
    reported = None
    try:
        message = await js.get_last_msg(CONFIG_REPORTS_STREAM, nats_subject(device, "config/reported"))
        value = json.loads(message.data or b"null")
        reported = value if isinstance(value, dict) else None
    except (NotFoundError, ValueError):
        pass
    return ConfigView(device, groups, desired, reported)
