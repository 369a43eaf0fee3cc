"""The rules of firmware/protocol.json's "settings" and "config" tables.

They are the firmware's own check (firmware/rules.py, plain Python that
CPython runs too), so the host refuses exactly what a board would refuse.
"""
from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

from fleet.paths import FIRMWARE_DIR

# What the firmware's "id" type accepts (device ids, group names): also a
# NATS subject token and a KV key, so the host can use ids as both.
ID_RULE = "[A-Za-z0-9_-]{1,32}"


def _firmware_rules() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fleet._firmware_rules", FIRMWARE_DIR / "rules.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_FIRMWARE = _firmware_rules()


def valid_id(value: Any) -> bool:
    return bool(_FIRMWARE.valid_id(value))


def id_problem(value: Any, what: str = "device id") -> str | None:
    """None for a valid id, else the one sentence every part of the host says."""
    return None if valid_id(value) else f"invalid {what} {value!r}: expected {ID_RULE}"


def problem(rule: dict[str, Any], value: Any) -> str | None:
    """None when `value` obeys `rule`, else what is wrong, in a few words."""
    found: str | None = _FIRMWARE.check(rule, value)
    return found


def parse_value(rule: dict[str, Any], raw: str) -> Any:
    """A value typed on a command line (key=value) as its rule's type:
    integers, booleans (true/false, on/off, yes/no, 1/0), comma lists; any
    other type stays text. Raises ValueError saying what was expected."""
    kind = rule["type"]
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"must be an integer, got {raw!r}") from None
    if kind == "bool":
        lowered = raw.lower()
        if lowered in ("true", "on", "yes", "1"):
            return True
        if lowered in ("false", "off", "no", "0"):
            return False
        raise ValueError(f"must be true or false, got {raw!r}")
    if kind == "list":
        return [item for item in raw.split(",") if item]
    return raw


__all__ = ["ID_RULE", "id_problem", "parse_value", "problem", "valid_id"]
