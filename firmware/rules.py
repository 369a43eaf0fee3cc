# The rules a value must obey, by its protocol.json schema entry: one
# copy, for settings.json at boot (settings.py), for pushed configuration
# (config.py) and for the host (fleet.schema runs this file in CPython), so
# the host refuses exactly what a board would refuse.


def valid_id(s):
    # [A-Za-z0-9_-]{1,32} without importing re (saves RAM on the boards).
    if not isinstance(s, str) or not 1 <= len(s) <= 32:
        return False
    for c in s:
        if not ("a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9" or c in "_-"):
            return False
    return True


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
