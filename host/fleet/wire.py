"""What crosses the wire, as dataclasses: device payloads in, registry records out.

Devices are not trusted: every payload is parsed here into a typed value or
rejected with MalformedPayload (one line saying why), so the gateway and the
tail tool agree on what "malformed" means. DeviceRecord is the JSON the
gateway keeps per device in the `fleet_devices` KV bucket and serves on the
fleet API.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, NamedTuple

import orjson

# Telemetry fields the firmware sends (firmware/device.py, telemetry.py) and
# the JSON types each may have; other fields are kept as they are, so newer
# firmware can add readings without the host calling them malformed.
_TELEMETRY_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "seq": (int,),
    "ts": (int, float, type(None)),
    "boot": (int, type(None)),
    "uptime_s": (int, float, type(None)),
    "heap_free": (int, type(None)),
    "temp_c": (int, float, type(None)),
    "rssi": (int, float, type(None)),
    "backlog": (int, type(None)),
    "dropped": (int, type(None)),
}

_PRESENCE_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "online": (bool,),
    "id": (str,),
    "board": (str, type(None)),
    "firmware": (str, type(None)),
    "boots": (int, type(None)),
    "reset": (str, type(None)),
    "groups": (list, type(None)),
    "config": (int, type(None)),
    "counters": (dict, type(None)),
}


_NUMBER = (int, float)
_RECORD_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "online": (bool,),
    "board": (str, type(None)),
    "firmware": (str, type(None)),
    "boots": (int, type(None)),
    "reset": (str, type(None)),
    "since": (*_NUMBER, type(None)),
    "last_seen": (*_NUMBER, type(None)),
    "last_seq": (int, type(None)),
    "last_telemetry": (dict, type(None)),
    "malformed": (int,),
    "presence_at": (*_NUMBER, type(None)),
    "presence_stream_seq": (int,),
    "telemetry_at": (*_NUMBER, type(None)),
    "telemetry_stream_seq": (int,),
    "groups": (list,),
    "config_version": (int, type(None)),
    "backlog": (int, type(None)),
    "dropped": (int, type(None)),
    "forwarded": (int, type(None)),
    "duplicates": (int, type(None)),
}


class MalformedPayload(ValueError):
    """A device payload that is not what the protocol says; args[0] says why."""


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; accepting them would put them in the
    # registry, whose readers then fail to parse it.
    raise ValueError(f"{name} is not a JSON number")


_COMPACT = json.JSONEncoder(separators=(",", ":"))


# One decoder for every payload: json.loads with an argument builds a new
# one per call, which costs as much as decoding a reading.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _json_object(data: bytes) -> dict[str, Any]:
    """The payload as a JSON object; the protocol's payloads are UTF-8."""
    try:
        value = _DECODER.decode(data.decode())
    except (UnicodeDecodeError, ValueError) as error:
        raise MalformedPayload(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise MalformedPayload(f"not a JSON object but {type(value).__name__}")
    return value


def _exact_types(types: dict[str, tuple[type, ...]]) -> dict[str, frozenset[type]]:
    """`types` for a look-up of type(value): what the JSON decoder makes is
    exactly dict, list, str, int, float, bool or None, and bool is not in a
    set that does not name it."""
    return {name: frozenset(allowed) for name, allowed in types.items()}


_TELEMETRY_EXACT_TYPES = _exact_types(_TELEMETRY_FIELD_TYPES)


def _reading_error(value: dict[str, Any]) -> str | None:
    """Why a decoded JSON object is not a reading, or None. Run for every
    record forwarded, so it looks each field up once rather than asking
    isinstance of each known field."""
    seq = value.get("seq")
    if type(seq) is not int:
        return "no 'seq' field" if "seq" not in value else "seq is not an integer"
    if seq < 0:
        return "seq is negative"
    exact = _TELEMETRY_EXACT_TYPES
    for name, item in value.items():
        allowed = exact.get(name)
        if allowed is not None and type(item) not in allowed:
            return f"{name} is a boolean" if type(item) is bool else f"{name} has type {type(item).__name__}"
    return None


def _check_types(value: dict[str, Any], types: dict[str, tuple[type, ...]]) -> None:
    for name, allowed in types.items():
        if name not in value:
            continue
        item = value[name]
        # bool is an int subclass in Python, but true is not a number on the wire.
        if isinstance(item, bool) and bool not in allowed:
            raise MalformedPayload(f"{name} is a boolean")
        if not isinstance(item, allowed):
            raise MalformedPayload(f"{name} has type {type(item).__name__}")


@dataclass(frozen=True)
class Presence:
    """A birth or last-will message on fleet/<id>/status."""

    online: bool
    board: str | None = None
    firmware: str | None = None
    boots: int | None = None
    reset: str | None = None
    groups: tuple[str, ...] | None = None  # birth only: the device's groups (settings)
    config: int | None = None  # birth only: the configuration version in force

    @classmethod
    def parse(cls, device_id: str, data: bytes) -> Presence:
        value = _json_object(data)
        if "online" not in value:
            raise MalformedPayload("no 'online' field")
        _check_types(value, _PRESENCE_FIELD_TYPES)
        # A status message naming another device is a misconfigured board
        # (copied settings): believing it would mix two devices in one record.
        if "id" in value and value["id"] != device_id:
            raise MalformedPayload(f"id {value['id']!r} does not match the topic's {device_id!r}")
        return cls(
            online=value["online"],
            board=value.get("board"),
            firmware=value.get("firmware"),
            boots=value.get("boots"),
            reset=value.get("reset"),
            groups=_groups(value.get("groups")),
            config=value.get("config"),
        )


def _groups(value: list[Any] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not all(isinstance(item, str) for item in value):
        raise MalformedPayload("groups must be a list of names")
    return tuple(value)


@dataclass(frozen=True)
class TelemetryReading:
    """One reading on fleet/<id>/telemetry; `payload` is the whole JSON object."""

    seq: int
    payload: dict[str, Any]

    @classmethod
    def parse(cls, data: bytes) -> TelemetryReading:
        return cls.from_value(_json_object(data))

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> TelemetryReading:
        """A reading from a JSON object already parsed."""
        error = _reading_error(value)
        if error is not None:
            raise MalformedPayload(error)
        return cls(seq=value["seq"], payload=value)


@dataclass
class DeviceRecord:
    """One device in the registry (KV bucket fleet_devices, key = device id).

    Times are unix seconds taken from the JetStream message timestamps, not
    from the gateway's clock, so every gateway instance computes the same
    record from the same messages. The *_at / *_stream_seq fields remember
    which message the presence and the last reading came from, so an older
    message processed late (by another instance, or redelivered) never
    overwrites a newer one.
    """

    id: str
    online: bool = False
    board: str | None = None
    firmware: str | None = None
    boots: int | None = None
    reset: str | None = None
    since: float | None = None  # last presence change (online flip or new boot)
    last_seen: float | None = None  # latest message of any kind from the device
    last_seq: int | None = None
    last_telemetry: dict[str, Any] | None = None
    malformed: int = 0
    presence_at: float | None = None
    presence_stream_seq: int = 0
    telemetry_at: float | None = None
    telemetry_stream_seq: int = 0
    groups: list[str] = field(default_factory=list)  # from the last birth message
    config_version: int | None = None  # configuration version in force at the last birth
    # From the forwarding state (fleet_forwarding), filled in when served:
    backlog: int | None = None  # readings on the board not yet acknowledged
    dropped: int | None = None  # readings the board lost to a full flash budget
    forwarded: int | None = None  # readings split into the telemetry stream
    duplicates: int | None = None  # readings received again and not stored twice

    @classmethod
    def from_json(cls, data: bytes | str | dict[str, Any]) -> DeviceRecord:
        """Parse a record; unknown keys are ignored (records from newer gateways)."""
        if isinstance(data, dict):
            value = data
        else:
            value = _json_object(data.encode() if isinstance(data, str) else data)
        if not isinstance(value.get("id"), str):
            raise MalformedPayload("a device record has a string 'id'")
        _check_types(value, _RECORD_FIELD_TYPES)
        known = {f.name for f in fields(cls)}
        return cls(**{name: item for name, item in value.items() if name in known})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @property
    def temp_c(self) -> float | None:
        reading = self.last_telemetry or {}
        temp = reading.get("temp_c")
        return float(temp) if isinstance(temp, (int, float)) and not isinstance(temp, bool) else None


class ForwardedRecord(NamedTuple):
    """One reading inside a batch, checked, and its JSON exactly as sent.
    A tuple: made for every reading forwarded, and a frozen dataclass takes
    several times as long to build (the splitter asks `reading` only of a
    device's newest)."""

    seq: int
    payload: dict[str, Any]
    raw: bytes

    @property
    def reading(self) -> TelemetryReading:
        return TelemetryReading(self.seq, self.payload)


@dataclass(frozen=True)
class ReadingBatch:
    """A message on fleet/<id>/batch: readings forwarded from the board's log.

    `dropped` is the board's running count of readings lost to its flash
    budget; `backlog` is how many were still waiting after this batch.
    `prev` is the last sequence of the batch the board sent just before
    this one while both were in flight (-1: none), so a batch that never
    reached the stream shows up as a hole. Records that are not readings
    are counted in `malformed` and left out: one bad record must not hold
    back the good ones around it.
    """

    dropped: int
    backlog: int
    records: tuple[ForwardedRecord, ...]
    malformed: int = 0
    prev: int = -1

    @classmethod
    def parse(cls, data: bytes) -> ReadingBatch:
        lines = data.split(b"\n")
        if len(lines) >= 3 and lines[0].endswith(b"[") and lines[-1] == b"]}":
            batch = cls._parse_lines(data, lines)
            if batch is not None:
                return batch
        value = _json_object(data)
        records = value.get("records")
        if not isinstance(records, list):
            raise MalformedPayload("no 'records' list")
        parsed: list[ForwardedRecord] = []
        malformed = 0
        encode = _COMPACT.encode
        for record in records:
            try:
                if not isinstance(record, dict):
                    raise MalformedPayload("a record is not an object")
                reading = TelemetryReading.from_value(record)
            except MalformedPayload:
                malformed += 1
                continue
            parsed.append(ForwardedRecord(reading.seq, record, encode(record).encode()))
        return cls._with_counts(value, tuple(parsed), malformed)

    @classmethod
    def _parse_lines(cls, data: bytes, lines: list[bytes]) -> ReadingBatch | None:
        """The firmware's layout: the envelope up to `"records": [` on the
        first line, one record per line (a comma after each but the last;
        indented, as the firmware lays a batch out where its log read it),
        `]}` on the last. JSON strings cannot hold a raw newline, so each
        record's line is its JSON exactly as the board sent it: parsed one
        by one, the records are stored as they are, not encoded again (that
        encoding was a third of the splitter's parsing time). None: not
        this layout after all; the caller parses the whole document."""
        try:
            value = _json_object(lines[0] + b"]}")
        except MalformedPayload:
            return None
        if value.get("records") != []:
            return None
        parsed: list[ForwardedRecord] = []
        malformed = 0
        last = len(lines) - 2
        # orjson, not json: a third of the time per record, for every reading
        # forwarded. Where it differs from json, on what no board sends (a
        # lone surrogate, an integer past 64 bits), the batch goes to json below.
        loads = orjson.loads
        for index in range(1, last + 1):
            line = lines[index]
            if index < last:
                if not line.endswith(b","):
                    return None
                line = line[:-1]
            if line.startswith(b" "):
                line = line.lstrip(b" ")
            try:
                record = loads(line)
            except orjson.JSONDecodeError:
                malformed += 1
                continue
            if type(record) is not dict or _reading_error(record) is not None:
                malformed += 1
                continue
            parsed.append(ForwardedRecord(record["seq"], record, line))
        if malformed:
            # A line that is not a reading: a corrupt record in this layout
            # (counted, the others kept), unless the whole document is JSON
            # laid out otherwise, which the caller then parses as a whole.
            try:
                _json_object(data)
                return None
            except MalformedPayload:
                pass
        return cls._with_counts(value, tuple(parsed), malformed)

    @classmethod
    def _with_counts(cls, value: dict[str, Any], records: tuple[ForwardedRecord, ...], malformed: int) -> ReadingBatch:
        counts = {}
        for name in ("dropped", "backlog"):
            count = value.get(name, 0)
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise MalformedPayload(f"{name} is not a count")
            counts[name] = count
        prev = value.get("prev", -1)
        if isinstance(prev, bool) or not isinstance(prev, int) or prev < -1:
            raise MalformedPayload("prev is not a sequence number")
        return cls(counts["dropped"], counts["backlog"], records, malformed, prev)


@dataclass
class ForwardingState:
    """Per device, in the `fleet_forwarding` KV bucket: what the splitter did.

    `last_seq` is the high-water mark that makes forwarding exactly once: the
    board sends oldest first and its sequence only grows, so a record at or
    below it was stored before (a batch sent again after a lost PUBACK).
    """

    id: str
    last_seq: int = -1
    forwarded: int = 0
    duplicates: int = 0
    malformed: int = 0
    dropped: int = 0
    backlog: int = 0
    gaps: list[dict[str, int]] = field(default_factory=list)  # newest last, bounded
    batches: int = 0
    holes: int = 0  # batches that followed one never stored: left for the board to resend

    @classmethod
    def from_json(cls, data: bytes) -> ForwardingState:
        value = _json_object(data)
        if not isinstance(value.get("id"), str):
            raise MalformedPayload("a forwarding state has a string 'id'")
        known = {f.name for f in fields(cls)}
        return cls(**{name: item for name, item in value.items() if name in known})

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    def copy(self) -> ForwardingState:
        """A copy to change without touching this one (gaps included)."""
        return replace(self, gaps=list(self.gaps))


__all__ = [
    "DeviceRecord",
    "ForwardedRecord",
    "ForwardingState",
    "MalformedPayload",
    "Presence",
    "ReadingBatch",
    "TelemetryReading",
]
