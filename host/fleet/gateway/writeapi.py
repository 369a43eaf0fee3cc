"""The fleet API's writing requests: send a command, change configuration.

The same checks as `fleet cmd send` and `fleet config set` (they share
cmdcli's targets, config's value checks and the stores), taking the JSON a
client sends instead of command-line words. Errors are FleetErrors; the
gateway turns them into micro error replies with `status_of`.
"""
from __future__ import annotations

import json
from typing import Any

from nats.aio.client import Client

from fleet.state.commands import CommandRecord, CommandStore, commands_bucket, parse_duration
from fleet.state.config import ConfigStore, Level, VersionConflict, check_value, config_bucket, level_key
from fleet.errors import FleetError, NotFound, Refused, Unavailable, UsageError
from fleet.state.inventory import check_level_target, command_targets


def parse_body(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data or b"null")
    except ValueError as error:
        raise UsageError(f"the request is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise UsageError("the request must be a JSON object")
    return body


def _target(body: dict[str, Any]) -> tuple[str | None, str | None, bool]:
    device, group, everyone = body.get("device"), body.get("group"), bool(body.get("all"))
    if [device is not None, group is not None, everyone].count(True) != 1:
        raise UsageError('name exactly one target: "device", "group" or "all": true')
    for name, value in (("device", device), ("group", group)):
        if value is not None and not isinstance(value, str):
            raise UsageError(f'"{name}" must be a string')
    return device, group, everyone


async def send_command(nc: Client, body: dict[str, Any]) -> list[CommandRecord]:
    """{"device"|"group"|"all", "name", "args"?, "ttl"? (seconds or "5m"), "force"?} -> one record per device."""
    device, group, everyone = _target(body)
    name, args, ttl = body.get("name"), body.get("args", {}), body.get("ttl")
    if not isinstance(name, str) or not name:
        raise UsageError('"name" must be the command\'s name, e.g. "ping"')
    if not isinstance(args, dict):
        raise UsageError('"args" must be a JSON object')
    if isinstance(ttl, str):
        ttl = parse_duration(ttl)
    elif ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0):
        raise UsageError('"ttl" must be a positive number of seconds or a duration like "5m"')
    js = nc.jetstream()
    targets = await command_targets(js, device, group, everyone, bool(body.get("force")))
    store = CommandStore(await commands_bucket(js))
    return [await store.create(target, name, args, ttl) for target in targets]


def _changes(body: dict[str, Any]) -> dict[str, Any]:
    values, removed = body.get("set", {}), body.get("remove", [])
    if not isinstance(values, dict) or not isinstance(removed, list):
        raise UsageError('"set" must be an object of key: value and "remove" a list of keys')
    for key, value in values.items():
        check_value(key, value)
    changes: dict[str, Any] = dict(values)
    for key in removed:
        if not isinstance(key, str):
            raise UsageError('"remove" must list key names')
        changes[key] = None
    if not changes:
        raise UsageError('nothing to change: give "set" and/or "remove"')
    return changes


def _if_version(body: dict[str, Any], field: str = "if_version") -> int | None:
    value = body.get(field)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise UsageError(f'"{field}" must be an integer')
    return value


async def set_config(nc: Client, body: dict[str, Any]) -> Level:
    """{"device"|"group"|"all", "set"?: {k: v}, "remove"?: [k], "if_version"?, "force"?} -> the new level."""
    device, group, _ = _target(body)
    key = level_key(device=device, group=group)
    changes = _changes(body)
    await check_level_target(nc, key, bool(body.get("force")), None)
    store = ConfigStore(await config_bucket(nc.jetstream()))
    return await store.set(key, changes, if_version=_if_version(body))


async def config_history(nc: Client, body: dict[str, Any]) -> list[Level]:
    device, group, _ = _target(body)
    store = ConfigStore(await config_bucket(nc.jetstream()))
    return await store.history(level_key(device=device, group=group))


async def rollback_config(nc: Client, body: dict[str, Any]) -> Level:
    """{"device"|"group"|"all", "to": version, "if_version"?} -> the level now in force."""
    device, group, _ = _target(body)
    to = _if_version(body, "to")
    if to is None:
        raise UsageError('"to" must be the version to go back to')
    store = ConfigStore(await config_bucket(nc.jetstream()))
    return await store.rollback(level_key(device=device, group=group), to, if_version=_if_version(body))


def status_of(error: FleetError) -> str:
    """The micro error code for a FleetError: 400, 404, 409, 503 or 500."""
    if isinstance(error, VersionConflict) or isinstance(error, Refused):
        return "409"
    if isinstance(error, NotFound):
        return "404"
    if isinstance(error, UsageError):
        return "400"
    if isinstance(error, Unavailable):
        return "503"
    return "500"


__all__ = ["config_history", "parse_body", "rollback_config", "send_command", "set_config", "status_of"]
