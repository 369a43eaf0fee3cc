"""`fleet cmd`: send commands and follow their state (KV bucket fleet_commands)."""
from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Any

from nats.js.errors import KeyNotFoundError, NotFoundError

from .commands import CommandError, CommandRecord, CommandStore, commands_bucket
from .inventory import registry_records
from .natsconn import connect
from .protocol import is_valid_device_id


async def _targets(js: Any, device: str | None, group: str | None, everyone: bool) -> list[str]:
    if device is not None:
        if not is_valid_device_id(device):
            raise CommandError(f"invalid device id {device!r}: expected [A-Za-z0-9_-]{{1,32}}")
        return [device]
    chosen = [
        record.id for record in await registry_records(js)
        if everyone or (group is not None and group in record.groups)
    ]
    if not chosen:
        raise CommandError(f"no device in group {group}" if group else "no devices known yet")
    return sorted(chosen)


async def send(
    nats_url: str, name: str, args: dict[str, Any], *, device: str | None = None, group: str | None = None,
    everyone: bool = False, ttl: float | None = None, wait: float | None = None, timeout: float = 5.0,
) -> list[CommandRecord]:
    """One command record per target device; with `wait`, until all are final or `wait` s pass."""
    nc = await connect(nats_url, name="fleet-cmd", timeout=timeout)
    try:
        js = nc.jetstream(timeout=timeout)
        store = CommandStore(await commands_bucket(js))
        records = [await store.create(target, name, args, ttl) for target in await _targets(js, device, group, everyone)]
        if wait is None:
            return records
        deadline = time.monotonic() + wait
        while True:
            records = [(await store.get(record.id))[0] for record in records]
            if all(record.final for record in records) or time.monotonic() > deadline:
                return records
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def status(nats_url: str, command_id: str, timeout: float = 5.0) -> CommandRecord:
    nc = await connect(nats_url, name="fleet-cmd", timeout=timeout)
    try:
        store = CommandStore(await commands_bucket(nc.jetstream(timeout=timeout)))
        try:
            return (await store.get(command_id))[0]
        except (KeyNotFoundError, NotFoundError):
            raise CommandError(f"no command {command_id}") from None
    finally:
        await nc.close()


async def list_for(nats_url: str, device: str, timeout: float = 5.0) -> list[CommandRecord]:
    nc = await connect(nats_url, name="fleet-cmd", timeout=timeout)
    try:
        store = CommandStore(await commands_bucket(nc.jetstream(timeout=timeout)))
        return [record for record in await store.all() if record.device == device]
    finally:
        await nc.close()


def format_record(record: CommandRecord) -> str:
    when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
    outcome = ""
    if record.state == "succeeded":
        outcome = " " + json.dumps(record.result)
    elif record.error:
        outcome = f" ({record.error})"
    return f"{record.id}  {record.device}  {record.name}  {record.state}  created {when}{outcome}"


__all__ = ["format_record", "list_for", "send", "status"]
