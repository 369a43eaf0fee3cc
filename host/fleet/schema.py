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


__all__ = ["problem", "valid_id"]
