"""`fleet cmd`: send commands and follow their state (KV bucket fleet_commands)."""
from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Any

from nats.js.errors import KeyNotFoundError, NotFoundError

from fleet.state.commands import CommandError, CommandRecord, CommandStore, commands_bucket
from fleet.errors import NotFound
from fleet.state.inventory import command_targets, format_age, gateway_answers, known_device, registry_records
from fleet.broker.connection import connect


async def send(
    nats_url: str, name: str, args: dict[str, Any], *, device: str | None = None, group: str | None = None,
    everyone: bool = False, ttl: float | None = None, wait: float | None = None, timeout: float = 5.0,
    force: bool = False, notes: list[str] | None = None,
) -> list[CommandRecord]:
    """One command record per target device; with `wait`, until all are final or `wait` s pass.

    `notes` collects what the user should know: no gateway to deliver the
    commands, and why the ones still unfinished after `wait` are not done.
    """
    nc = await connect(nats_url, name="fleet-cmd", timeout=timeout)
    try:
        js = nc.jetstream(timeout=timeout)
        targets = await command_targets(js, device, group, everyone, force)
        store = CommandStore(await commands_bucket(js))
        records = [await store.create(target, name, args, ttl) for target in targets]
        gateway_up = await gateway_answers(nc)
        if not gateway_up and notes is not None:
            notes.append("no fleet gateway is running: the commands stay queued until `fleet gateway` runs")
        if wait is None:
            return records
        deadline = time.monotonic() + wait
        while True:
            records = [(await store.get(record.id))[0] for record in records]
            if all(record.final for record in records):
                return records
            if time.monotonic() > deadline:
                if notes is not None:
                    notes.extend(await why_unfinished(nc, records, wait, gateway_up))
                return records
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def why_unfinished(nc: Any, records: list[CommandRecord], waited: float, gateway_up: bool) -> list[str]:
    """One sentence per command not final after the wait: what it is waiting for."""
    from fleet.state.inventory import fetch_health_over

    registry = {record.id: record for record in await registry_records(nc.jetstream())}
    mqtt_down = [] if not gateway_up else [
        health for health in await fetch_health_over(nc, 1.0)
        if health.get("mqtt") is not None and not health["mqtt"].get("connected")
    ]
    now = time.time()
    reasons = []
    for record in records:
        if record.final:
            continue
        why = f"{record.id} to {record.device} still {record.state} after {waited:g} s"
        device = registry.get(record.device)
        if not gateway_up:
            why += ": no fleet gateway is running to deliver it"
        elif mqtt_down and record.state == "queued":
            mqtt = mqtt_down[0]["mqtt"]
            why += f": the gateway cannot reach its MQTT listener {mqtt.get('address')} ({mqtt.get('error')})"
        elif device is None or not device.online:
            since = f" since {format_age(now - device.since)}" if device is not None and device.since else ""
            why += f": {record.device} is offline{since}; it gets the command when it reconnects"
            if record.expires is not None:
                why += f" (unless it expires first, in {max(0, record.expires - now):.0f} s)"
        else:
            why += f": {record.device} is online but has not answered"
        reasons.append(why)
    return reasons


async def status(nats_url: str, command_id: str, timeout: float = 5.0) -> CommandRecord:
    nc = await connect(nats_url, name="fleet-cmd", timeout=timeout)
    try:
        store = CommandStore(await commands_bucket(nc.jetstream(timeout=timeout)))
        try:
            return (await store.get(command_id))[0]
        except (KeyNotFoundError, NotFoundError):
            raise NotFound(f"no command {command_id} (`fleet cmd list DEVICE` lists a device's commands)") from None
    finally:
        await nc.close()


async def list_for(nats_url: str, device: str, timeout: float = 5.0) -> list[CommandRecord]:
    nc = await connect(nats_url, name="fleet-cmd", timeout=timeout)
    try:
        js = nc.jetstream(timeout=timeout)
        store = CommandStore(await commands_bucket(js))
        found = [record for record in await store.all() if record.device == device]
        if not found:
            await known_device(js, device)  # none sent, or no such device: say which
        return found
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
