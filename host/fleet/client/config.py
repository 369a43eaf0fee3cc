"""`fleet config`: set, get, history and rollback of desired configuration.

Works on the KV bucket directly (no gateway needed to change it); the
gateway publishes the result to the boards.
"""
from __future__ import annotations

from typing import Any

from fleet.state.config import (
    ConfigStore, ConfigView, Level, config_bucket, config_view, describe_level, level_key, parse_assignment,
)
from fleet.state.inventory import check_level_target, gateway_answers, known_device
from fleet.broker.connection import connect


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


__all__ = ["ConfigView", "config_view", "get_config", "history", "rollback", "set_config"]
