# Board settings: a JSON file on flash, checked against the "settings" table
# of protocol.json (the same table the host uses to write settings files).
import json

SETTINGS_FILE = "settings.json"
PROTOCOL_FILE = "protocol.json"


class SettingsError(Exception):
    # args[0] is one line naming the field and what is wrong with it.
    pass


def valid_id(s):
    # [A-Za-z0-9_-]{1,32} without importing re (saves RAM on the boards).
    if not isinstance(s, str) or not 1 <= len(s) <= 32:
        return False
    for c in s:
        if not ("a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9" or c in "_-"):
            return False
    return True


def load_protocol(path=None):
    # protocol.json sits beside this module on the board and in the repo.
    if path is None:
        path = __file__.rsplit("/", 1)[0] + "/" + PROTOCOL_FILE if "/" in __file__ else PROTOCOL_FILE
    with open(path) as f:
        return json.load(f)


def check(rule, value):
    # None when `value` obeys `rule` (a protocol.json schema entry), else
    # what is wrong with it, in a few words.
    kind = rule["type"]
    if kind == "bool":
        if not isinstance(value, bool):
            return "must be true or false, got %r" % (value,)
    elif kind == "choice":
        if value not in rule["values"]:
            return "must be one of %s, got %r" % (", ".join(rule["values"]), value)
    elif kind == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            return "must be an integer, got %r" % (value,)
        if not rule.get("min", value) <= value <= rule.get("max", value):
            return "must be from %d to %d, got %d" % (rule["min"], rule["max"], value)
    elif kind == "str":
        if not isinstance(value, str):
            return "must be a string, got %r" % (value,)
        if not rule.get("min", 0) <= len(value) <= rule.get("max", len(value)):
            return "must be %d to %d characters long" % (rule.get("min", 0), rule["max"])
    elif kind == "id":
        if not valid_id(value):
            return "must match [A-Za-z0-9_-]{1,32}, got %r" % (value,)
    elif kind == "list":
        if not isinstance(value, list) or len(value) > rule["max"]:
            return "must be a list of at most %d names" % rule["max"]
        for item in value:
            if not valid_id(item):
                return "entries must match [A-Za-z0-9_-]{1,32}, got %r" % (item,)
    return None


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
