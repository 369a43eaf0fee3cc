# Board settings: a JSON file on flash, checked against the "settings" table
# of protocol.json (the same table the host uses to write settings files),
# and what else a boot reads of protocol.json. Boot-only code: startup.py
# imports it for each boot and lets go of it before the Device is built.
import json
import sys
from time import sleep_ms

from rules import check

SETTINGS_FILE = "settings.json"
PROTOCOL_FILE = "protocol.json"


class SettingsError(Exception):
    # args[0] is one line naming the field and what is wrong with it.
    pass


def load_protocol(path=None):
    # protocol.json sits beside this module on the board and in the repo.
    if path is None:
        path = __file__.rsplit("/", 1)[0] + "/" + PROTOCOL_FILE if "/" in __file__ else PROTOCOL_FILE
    with open(path) as f:
        return json.load(f)


def validate(raw, schema):
    # Returns the settings with defaults filled in, or raises SettingsError.
    if not isinstance(raw, dict):
        raise SettingsError("%s must hold a JSON object" % SETTINGS_FILE)
    for key in raw:
        if key not in schema:
            raise SettingsError("%s: unknown setting (known: %s)" % (key, ", ".join(sorted(schema))))
    out = {}
    for name, rule in schema.items():
        if name in raw and raw[name] is not None:
            problem = check(rule, raw[name])
            if problem:
                raise SettingsError("%s: %s" % (name, problem))
            out[name] = raw[name]
        elif "default" in rule:
            out[name] = rule["default"]
        elif rule.get("required", True):
            raise SettingsError("%s: missing (required)" % name)
        else:
            out[name] = None
    if out["reconnect_min_ms"] > out["reconnect_max_ms"]:
        raise SettingsError("reconnect_min_ms: must not exceed reconnect_max_ms")
    return out


def load(schema, path=SETTINGS_FILE):
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        raise SettingsError("%s: not found on flash (write it with `fleet provision`)" % path)
    try:
        raw = json.loads(text)
    except ValueError:
        raise SettingsError("%s: not valid JSON" % path)
    return validate(raw, schema)


def load_retrying(schema, log):
    # Retry with backoff until the settings are usable; one clear line each time.
    delay = 1000
    while True:
        try:
            return load(schema)
        except SettingsError as e:
            log("settings error: %s; retrying in %d s" % (e.args[0], delay // 1000))
        sleep_ms(delay)
        delay = min(delay * 2, 60000)


def too_old(minimum, version=None):
    # The MicroPython version when it is older than `minimum` ("1.22"), else None.
    if version is None:
        version = sys.implementation.version
    wanted = tuple(int(part) for part in minimum.split("."))
    return "%d.%d.%d" % tuple(version[:3]) if tuple(version[: len(wanted)]) < wanted else None


def for_device(log):
    # The settings, once usable, and the little of protocol.json a Device
    # needs (the whole file is about 11 KB of heap as objects on the unix
    # port). Said at every boot, then carried on: a MicroPython older than
    # the firmware supports (most things may still work, and a board that
    # refuses to start cannot be reached to update it).
    protocol = load_protocol()
    minimum = protocol.get("micropython_min")
    old = minimum and too_old(minimum)
    if old:
        log("MicroPython %s is older than %s, the oldest this firmware supports: update the board's MicroPython" % (old, minimum))
    return load_retrying(protocol["settings"], log), {
        "firmware": protocol["firmware"],
        "topic_root": protocol["topic_root"],
        "topics": list(protocol["topics"]),
        "fleet_topics": list(protocol["fleet_topics"]),
        # Without the "about" texts, which are for people and cost heap.
        "config": {key: {k: v for k, v in rule.items() if k != "about"} for key, rule in protocol["config"].items()},
    }
