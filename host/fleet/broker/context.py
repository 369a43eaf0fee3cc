"""Where the fleet's server is, remembered like the `nats` CLI's contexts.

`fleet server` and `fleet sim` write what they listen on to DATA_DIR/context.json
and save it as a named context ($XDG_CONFIG_HOME/fleet/contexts/NAME.json),
which they select; every other command then finds the server with no flag
and no environment variable. Which one a command uses, first match wins:
--nats / --mqtt, $FLEET_NATS_URL / $FLEET_MQTT, --context, $FLEET_CONTEXT,
the selected context, the defaults (nats://127.0.0.1:4222, 127.0.0.1:1883).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fleet.errors import NotFound, UsageError
from fleet.redact import redact_url

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_MQTT = "127.0.0.1:1883"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass
class Context:
    name: str
    nats_url: str
    mqtt: str | None = None  # host:port of the MQTT listener
    data_dir: str | None = None
    pid: int | None = None  # the process that wrote it, while it runs
    written_by: str | None = None
    written_at: float | None = None
    credentials: str | None = None  # a credentials file, once the server needs one

    @property
    def writer_alive(self) -> bool | None:
        """Whether the process that wrote it still runs; None when none is recorded."""
        if self.pid is None:
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_file(cls, path: Path) -> Context:
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or not isinstance(data.get("nats_url"), str):
                raise ValueError("no nats_url")
            known = {key: data.get(key) for key in cls.__dataclass_fields__ if key in data}
            known.setdefault("name", path.stem)
            return cls(**known)
        except (OSError, ValueError, TypeError) as error:
            raise UsageError(f"{path} is not a fleet context: {error}") from None


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fleet"


def contexts_dir() -> Path:
    return config_dir() / "contexts"


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise UsageError(f"invalid context name {name!r}: letters, digits, '.', '_' and '-'")
    return name


def selected_name() -> str | None:
    try:
        return (config_dir() / "context.txt").read_text().strip() or None
    except OSError:
        return None


def select(name: str) -> None:
    load(name)  # refuses an unknown name
    config_dir().mkdir(parents=True, exist_ok=True)
    (config_dir() / "context.txt").write_text(name + "\n")


def save(context: Context, *, selected: bool = False) -> Path:
    _check_name(context.name)
    contexts_dir().mkdir(parents=True, exist_ok=True)
    path = contexts_dir() / f"{context.name}.json"
    path.write_text(json.dumps(context.to_json(), indent=2) + "\n")
    if selected:
        select(context.name)
    return path


def remove(name: str) -> None:
    path = contexts_dir() / f"{_check_name(name)}.json"
    if not path.exists():
        raise NotFound(f"no context {name} (`fleet context` lists them)")
    path.unlink()
    if selected_name() == name:
        (config_dir() / "context.txt").unlink(missing_ok=True)


def all_contexts() -> list[Context]:
    if not contexts_dir().is_dir():
        return []
    return [Context.from_file(path) for path in sorted(contexts_dir().glob("*.json"))]


def load(name_or_path: str) -> Context:
    """A context by name, or from a context.json, or from a data folder holding one."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "context.json"
    if path.suffix == ".json" and path.exists():
        return Context.from_file(path)
    if "/" in name_or_path or name_or_path.endswith(".json"):
        raise NotFound(f"no fleet context at {name_or_path}")
    named = contexts_dir() / f"{_check_name(name_or_path)}.json"
    if not named.exists():
        raise NotFound(f"no context {name_or_path} (`fleet context` lists them)")
    return Context.from_file(named)


def record(data_dir: Path, name: str, nats_url: str, mqtt: str, written_by: str) -> Context:
    """What `fleet server` and `fleet sim` do once they listen: write, save and select."""
    context = Context(name=name, nats_url=nats_url, mqtt=mqtt, data_dir=str(Path(data_dir).resolve()),
                      pid=os.getpid(), written_by=written_by, written_at=time.time())
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    (Path(data_dir) / "context.json").write_text(json.dumps(context.to_json(), indent=2) + "\n")
    save(context, selected=True)
    return context


def apply_context(args: Any) -> None:
    """Fill args.nats (and args.mqtt where the command has it) by the order above;
    args.nats_source says where the URL came from, for error messages."""
    explicit_nats = getattr(args, "nats", None)
    explicit_mqtt = getattr(args, "mqtt", None) if hasattr(args, "mqtt") else None
    context: Context | None = None
    source = "the default"
    chosen = getattr(args, "context", None) or os.environ.get("FLEET_CONTEXT")
    if chosen:
        context = load(chosen)
    elif (name := selected_name()) is not None:
        try:
            context = load(name)
        except NotFound:
            context = None  # removed by hand: fall back to the defaults
    if explicit_nats:
        args.nats, source = explicit_nats, "--nats"
    elif os.environ.get("FLEET_NATS_URL"):
        args.nats, source = os.environ["FLEET_NATS_URL"], "$FLEET_NATS_URL"
    elif context is not None:
        args.nats, source = context.nats_url, f"context {context.name}"
    else:
        args.nats = DEFAULT_NATS_URL
    args.nats_source = source
    args.nats_context = context if source.startswith("context") else None
    if hasattr(args, "mqtt") and getattr(args, "command", None) == "gateway":
        if explicit_mqtt:
            args.mqtt = explicit_mqtt
        elif os.environ.get("FLEET_MQTT"):
            args.mqtt = os.environ["FLEET_MQTT"]
        elif context is not None and context.mqtt:
            args.mqtt = context.mqtt
        else:
            args.mqtt = DEFAULT_MQTT


def describe_source(args: Any) -> str:
    """For an unreachable server: which context pointed there, and whether its writer is gone."""
    context: Context | None = getattr(args, "nats_context", None)
    if context is None:
        source = getattr(args, "nats_source", None)
        return f" (from {source})" if source and source != "--nats" else ""
    text = f" (from context {context.name}"
    if context.writer_alive is False:
        text += f"; {context.written_by or 'the process'} (pid {context.pid}) that wrote it is no longer running"
    return text + ")"


def describe(context: Context, selected: bool) -> str:
    alive = context.writer_alive
    state = "" if alive is None else (" running" if alive else " (writer gone)")
    mark = "*" if selected else " "
    who = f"  {context.written_by} pid {context.pid}{state}" if context.written_by else ""
    return f"{mark} {context.name}  {redact_url(context.nats_url)}  mqtt {context.mqtt or '-'}{who}"


__all__ = [
    "Context", "DEFAULT_MQTT", "DEFAULT_NATS_URL", "all_contexts", "apply_context", "describe", "describe_source",
    "load", "record", "remove", "save", "select", "selected_name",
]
