"""The client side of the fleet API: ask a running gateway who is out there.

Requests go to the `fleet` micro service (any gateway instance answers);
errors come back as micro error headers and are raised as ApiError.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER

from fleet.state.commands import CommandError
from fleet.errors import NotFound, Refused, Unavailable
from fleet.broker.jetstream import bucket_keys
from fleet.broker.connection import connect
from fleet.protocol import DEVICES_BUCKET, api_subject
from fleet.schema import id_problem
from fleet.wire import DeviceRecord

log = logging.getLogger(__name__)


class GatewayNotRunning(Unavailable):
    """Nobody serves the fleet API (or nobody answered in time)."""


class ApiError(Refused):
    """An error reply from the fleet API: code 400 (bad request), 404 (unknown), 500."""

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{description} ({code})")
        self.code = code
        self.description = description


class DeviceNotFound(ApiError, NotFound):
    pass


async def _request(nc: Client, endpoint: str, payload: bytes, timeout: float) -> bytes:
    subject = api_subject(endpoint)
    try:
        reply = await nc.request(subject, payload, timeout=timeout)
    except nats.errors.NoRespondersError:
        raise GatewayNotRunning("the fleet gateway is not running (no responders on " + subject + ")") from None
    except nats.errors.TimeoutError:
        raise GatewayNotRunning(f"the fleet gateway did not answer on {subject} within {timeout:g} s") from None
    headers = reply.headers or {}
    if ERROR_CODE_HEADER in headers:
        code_text = headers[ERROR_CODE_HEADER]
        code = int(code_text) if code_text.isdigit() else 500
        error_type = DeviceNotFound if code == 404 else ApiError
        raise error_type(code, headers.get(ERROR_HEADER, "fleet API error"))
    return reply.data


async def fetch_devices(nats_url: str, timeout: float = 5.0) -> list[DeviceRecord]:
    """Every device the gateway knows, sorted by id.

    Raises NatsUnavailable, GatewayNotRunning or ApiError.
    """
    nc = await connect(nats_url, name="fleet-devices", timeout=timeout)
    try:
        data = await _request(nc, "devices", b"", timeout)
    finally:
        await nc.close()
    items = json.loads(data)
    if not isinstance(items, list):
        raise ApiError(500, "the devices reply is not a JSON list")
    return [DeviceRecord.from_json(item) for item in items]


async def fetch_device(nats_url: str, device_id: str, timeout: float = 5.0) -> DeviceRecord:
    """One device's record; DeviceNotFound (404) when the gateway has never heard of it."""
    nc = await connect(nats_url, name="fleet-devices", timeout=timeout)
    try:
        data = await _request(nc, "device", device_id.encode(), timeout)
    finally:
        await nc.close()
    return DeviceRecord.from_json(data)


# -- presentation ------------------------------------------------------------------

TABLE_COLUMNS = ("DEVICE", "ONLINE", "BOARD", "FIRMWARE", "BOOTS", "LAST SEEN", "SEQ", "TEMP", "BACKLOG", "DROPPED")


def format_age(seconds: float) -> str:
    """How long ago, coarsely: '3s ago', '4m ago', '2h ago', '5d ago'."""
    seconds = max(0.0, seconds)  # the server's clock may run a little ahead of ours
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def table_row(record: DeviceRecord, now: float) -> tuple[str, ...]:
    def text(value: object) -> str:
        return "-" if value is None else str(value)

    temp = record.temp_c
    return (
        record.id,
        "yes" if record.online else "no",
        text(record.board),
        text(record.firmware),
        text(record.boots),
        format_age(now - record.last_seen) if record.last_seen is not None else "never",
        text(record.last_seq),
        f"{temp:.1f}" if temp is not None else "-",
        text(record.backlog),
        text(record.dropped),
    )


def format_table(records: Sequence[DeviceRecord], now: float | None = None) -> str:
    """A plain-text table, one line per device, columns padded to fit."""
    now = time.time() if now is None else now
    rows = [TABLE_COLUMNS, *(table_row(record, now) for record in records)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


async def registry_records(js: JetStreamContext) -> list[DeviceRecord]:
    """Every record in the registry bucket, read directly (no gateway needed);
    empty when there is no registry yet."""
    try:
        registry = await js.key_value(DEVICES_BUCKET)
    except BucketNotFoundError:  # no registry yet
        return []
    return await read_registry(registry)


async def read_registry(registry: KeyValue) -> list[DeviceRecord]:
    """Every record in the registry, sorted by device id; a key that is not
    a device record (written by another tool) is logged and skipped."""
    records = []
    for key in await bucket_keys(registry):
        try:
            records.append(DeviceRecord.from_json((await registry.get(key)).value or b""))
        except KeyNotFoundError:
            continue  # deleted meanwhile
        except ValueError as error:
            log.warning("registry key %s is not a device record: %s", key, error)
    return sorted(records, key=lambda record: record.id)


class UnknownDevice(NotFound):
    """A device id no board has ever connected with."""

    def __init__(self, device_id: str) -> None:
        super().__init__(
            f"unknown device {device_id}: no board with this id has connected yet (`fleet devices` lists the known ones)"
        )
        self.device_id = device_id


async def known_device(js: JetStreamContext, device_id: str) -> DeviceRecord:
    """The registry's record of `device_id`, read directly; UnknownDevice when
    no board with that id has ever connected (or no gateway ever ran)."""

    if problem := id_problem(device_id):
        from fleet.errors import UsageError

        raise UsageError(problem)
    try:
        registry = await js.key_value(DEVICES_BUCKET)
        entry = await registry.get(device_id)
    except (BucketNotFoundError, KeyNotFoundError):
        raise UnknownDevice(device_id) from None
    try:
        return DeviceRecord.from_json(entry.value or b"")
    except ValueError:
        return DeviceRecord(id=device_id)


async def gateway_answers(nc: Client, timeout: float = 1.0) -> bool:
    """Whether any fleet gateway is serving (the micro service's PING)."""
    try:
        await nc.request("$SRV.PING.fleet", b"", timeout=timeout)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return False
    return True


async def fetch_health_over(nc: Client, timeout: float = 1.0) -> list[dict[str, Any]]:
    """Every gateway's answer on fleet-api.health within `timeout`, over an open
    connection; empty when none runs (or none of them has the endpoint yet)."""
    import asyncio

    answers: list[dict[str, Any]] = []
    inbox = nc.new_inbox()
    subscription = await nc.subscribe(inbox)
    try:
        await nc.publish(api_subject("health"), b"", reply=inbox)
        deadline = asyncio.get_running_loop().time() + timeout
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                message = await subscription.next_msg(timeout=left)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                break
            if message.headers and message.headers.get("Status") == "503":
                break  # no responders
            try:
                answer = json.loads(message.data)
            except ValueError:
                continue
            if isinstance(answer, dict):
                answers.append(answer)
                # Gateways answer together: once one has, the rest follow within moments.
                deadline = min(deadline, asyncio.get_running_loop().time() + 0.25)
    finally:
        await subscription.unsubscribe()
    return answers


async def command_targets(js: Any, device: str | None, group: str | None, everyone: bool, force: bool = False) -> list[str]:
    if device is not None:
        if problem := id_problem(device):
            raise CommandError(problem)
        if not force:
            try:
                await known_device(js, device)
            except UnknownDevice as error:
                raise NotFound(f"{error}; --force queues the command for a board not yet provisioned") from None
        return [device]
    chosen = [
        record.id for record in await registry_records(js)
        if everyone or (group is not None and group in record.groups)
    ]
    if not chosen:
        raise NotFound(f"no known device is in group {group}" if group else "no devices known yet (`fleet devices` lists them)")
    return sorted(chosen)


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


__all__ = [
    "check_level_target",
    "command_targets",
    "ApiError",
    "DeviceNotFound",
    "DeviceRecord",
    "GatewayNotRunning",
    "TABLE_COLUMNS",
    "UnknownDevice",
    "fetch_device",
    "fetch_devices",
    "format_age",
    "fetch_health_over",
    "format_table",
    "gateway_answers",
    "known_device",
    "read_registry",
    "registry_records",
    "table_row",
]
