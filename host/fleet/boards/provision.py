"""Writing a board's settings.json: WiFi, broker, device id, credentials.

Secrets (the schema marks them "secret": WiFi and MQTT passwords) never
come from the command line, where `ps` and the shell history would keep
them: they are read from environment variables or asked for without echo,
written to a file only its owner can read, and shown as "********".
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fleet.errors import UsageError
from fleet.protocol import settings_schema
from fleet.schema import parse_value, problem

HIDDEN = "********"
# Environment variables a secret is read from when no other is named.
SECRET_ENV = {"wifi_password": "FLEET_WIFI_PASSWORD", "mqtt_password": "FLEET_MQTT_PASSWORD"}


class ProvisionError(UsageError):
    """Settings the board would refuse; args[0] names the field."""


def secret_keys() -> list[str]:
    return [key for key, rule in settings_schema().items() if rule.get("secret")]


def check_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """The settings without their None values, once every key is one the
    board knows, each obeys its rule, and the required ones are present;
    else ProvisionError naming the field. The same checks as the board's
    settings.py, so a file that passes here boots there."""
    schema = settings_schema()
    settings: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key not in schema:
            raise ProvisionError(f"{key}: unknown setting (known: {', '.join(sorted(schema))})")
        wrong = problem(schema[key], value)
        if wrong:
            raise ProvisionError(f"{key}: {wrong}")
        settings[key] = value
    for key, rule in schema.items():
        if rule.get("required", True) and "default" not in rule and key not in settings:
            raise ProvisionError(f"{key}: missing (required)")
    return settings


def build_settings(device_id: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """Checked settings for one board. Defaults are left to the board, so a
    firmware update can change them."""
    if wrong := problem({"type": "id"}, device_id):
        raise ProvisionError(f"device_id: {wrong}")
    return check_settings({"device_id": device_id, **values})


def parse_setting(text: str) -> tuple[str, Any]:
    """'key=value' typed by the schema: integers, comma lists, text."""
    key, sep, raw = text.partition("=")
    schema = settings_schema()
    if not sep or key not in schema:
        raise ProvisionError(f"{text!r}: expected key=value with a known key (known: {', '.join(sorted(schema))})")
    if schema[key].get("secret"):
        raise ProvisionError(f"{key}: a secret is never given on the command line; set {SECRET_ENV.get(key, key)}")
    try:
        return key, parse_value(schema[key], raw)
    except ValueError as error:
        raise ProvisionError(f"{key}: {error}") from None


def read_secrets(
    environ: Mapping[str, str], ask: Callable[[str], str] | None, names: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Each secret from its environment variable, else from `ask` (a
    no-echo prompt) when there is one; absent secrets are left out."""
    found: dict[str, str] = {}
    for key in secret_keys():
        variable = (names or {}).get(key) or SECRET_ENV.get(key, "FLEET_" + key.upper())
        if variable in environ:
            found[key] = environ[variable]
        elif ask is not None:
            answer = ask(f"{key} (empty for none): ")
            if answer:
                found[key] = answer
    return found


def redacted(settings: Mapping[str, Any]) -> dict[str, Any]:
    secrets = set(secret_keys())
    return {key: (HIDDEN if key in secrets and value else value) for key, value in settings.items()}


def write_settings(path: Path, settings: Mapping[str, Any]) -> None:
    """Written owner-only (0600) from the first byte, then renamed in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(dict(settings), f, indent=1)
        f.write("\n")
    os.replace(partial, path)


__all__ = [
    "HIDDEN", "ProvisionError", "SECRET_ENV", "build_settings", "check_settings", "parse_setting", "read_secrets", "redacted",
    "secret_keys", "write_settings",
]
