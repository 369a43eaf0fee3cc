"""`fleet config`: set, get, history and rollback of desired configuration.

Works on the KV bucket directly (no gateway needed to change it); the
gateway publishes the result to the boards.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nats.js.errors import KeyNotFoundError, NotFoundError

from .config import ConfigStore, Effective, Level, config_bucket, describe_level, level_key, parse_assignment
from .errors import NotFound
from .inventory import UnknownDevice, gateway_answers, known_device, registry_records
from .natsconn import connect
from .protocol import CONFIG_REPORTS_STREAM, DEVICES_BUCKET, nats_subject
from .wire import DeviceRecord


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


async def _store(nats_url: str, timeout: float) -> tuple[Any, ConfigStore]:
    nc = await connect(nats_url, name="fleet-config", timeout=timeout)
    js = nc.jetstream(timeout=timeout)
    return nc, ConfigStore(await config_bucket(js))


async def set_config(
    nats_url: str, key: str, assignments: list[str], if_version: int | None, timeout: float = 5.0,
    force: bool = False, notes: list[str] | None = None,
) -> Level:
    """Change one level. A device level needs a device that has connected
    (`force`: one not provisioned yet); `notes` gets what the user should know."""
    changes = dict(parse_assignment(text) for text in assignments)  # refused here, before anything is stored
    nc, store = await _store(nats_url, timeout)
    try:
        await check_level_target(nc, key, force, notes)
        level = await store.set(key, changes, if_version=if_version)
        if notes is not None and not await gateway_answers(nc):
            notes.append("no fleet gateway is running: the boards get this once `fleet gateway` runs")
        return level
    finally:
        await nc.close()


async def check_level_target(nc: Any, key: str, force: bool, notes: list[str] | None) -> None:
    """Refuse a device level for a device never seen (unless forced); note an empty group."""
    kind, _, name = key.partition(".")
    js = nc.jetstream()
    if kind == "device" and not force:
        try:
            await known_device(js, name)
        except UnknownDevice as error:
            raise NotFound(f"{error}; --force sets it for a board not yet provisioned") from None
    elif kind == "group" and notes is not None:
        if not any(name in record.groups for record in await registry_records(js)):
            notes.append(f"no known device is in group {name} yet: the setting waits for its members")


async def history(nats_url: str, key: str, timeout: float = 5.0) -> list[Level]:
    nc, store = await _store(nats_url, timeout)
    try:
        levels = await store.history(key)
        if not levels and key.startswith("device."):
            await known_device(nc.jetstream(), key.partition(".")[2])  # an empty history, or no such device
        return levels
    finally:
        await nc.close()


async def rollback(nats_url: str, key: str, version: int, if_version: int | None, timeout: float = 5.0) -> Level:
    nc, store = await _store(nats_url, timeout)
    try:
        return await store.rollback(key, version, if_version=if_version)
    finally:
        await nc.close()


async def get_config(nats_url: str, device: str, timeout: float = 5.0) -> ConfigView:
    level_key(device=device)  # validates the id
    nc = await connect(nats_url, name="fleet-config", timeout=timeout)
    try:
        view = await config_view(nc, device, timeout)
        own_level = any(level.key == level_key(device=device) for level in view.desired.levels)
        if not own_level and view.reported is None:
            await known_device(nc.jetstream(timeout=timeout), device)  # set with --force, or no such device
        return view
    finally:
        await nc.close()


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

__all__ = ["ConfigView", "config_view", "get_config", "history", "rollback", "set_config"]
