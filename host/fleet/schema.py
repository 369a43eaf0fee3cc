"""The rules of firmware/protocol.json's "settings" and "config" tables,
checked on the host exactly as firmware/settings.py checks them on the
board, so a bad value is refused before it reaches one."""
from __future__ import annotations

import re
from typing import Any

_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")


def valid_id(value: Any) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def problem(rule: dict[str, Any], value: Any) -> str | None:
    """None when `value` obeys `rule`, else what is wrong, in a few words."""
    kind = rule["type"]
    if kind == "bool":
        if not isinstance(value, bool):
            return f"must be true or false, got {value!r}"
    elif kind == "choice":
        if value not in rule["values"]:
            return f"must be one of {', '.join(rule['values'])}, got {value!r}"
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {value!r}"
        if not rule.get("min", value) <= value <= rule.get("max", value):
            return f"must be from {rule['min']} to {rule['max']}, got {value}"
    elif kind == "str":
        if not isinstance(value, str):
            return f"must be a string, got {value!r}"
        if not rule.get("min", 0) <= len(value) <= rule.get("max", len(value)):
            return f"must be {rule.get('min', 0)} to {rule['max']} characters long"
    elif kind == "id":
        if not valid_id(value):
            return f"must match [A-Za-z0-9_-]{{1,32}}, got {value!r}"
    elif kind == "list":
        if not isinstance(value, list) or len(value) > rule["max"]:
            return f"must be a list of at most {rule['max']} names"
        for item in value:
            if not valid_id(item):
                return f"entries must match [A-Za-z0-9_-]{{1,32}}, got {item!r}"
    return None


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


__all__ = ["parse_value", "problem", "valid_id"]
