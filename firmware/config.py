# Configuration pushed by the gateway: validated against the "config" table
# of protocol.json, applied live, kept on flash (config.json, replaced
# atomically) so a board that boots offline runs with what it last applied,
# and reported on fleet/<id>/config/reported.
#
# A message on fleet/<id>/config is {"version": V, "config": {...}}. Keys
# left out take their default (the board's settings, or the schema's). A
# version at or below the applied one is not applied again; an invalid
# configuration is rejected and the one in force stays, as it does when the
# retained copy is cleared (an empty message).
import json

from rules import check
from state import dump_atomic

CONFIG_FILE = "config.json"


def validate(raw, schema):
    # (values, None) or (None, "key: what is wrong").
    if not isinstance(raw, dict):
        return None, "config must be a JSON object"
    for key in raw:
        if key not in schema:
            return None, "%s: unknown key (known: %s)" % (key, ", ".join(sorted(schema)))
    for key, value in raw.items():
        problem = check(schema[key], value)
        if problem:
            return None, "%s: %s" % (key, problem)
    return raw, None


class Config:
    def __init__(self, schema, apply, report, log, path=CONFIG_FILE, version=0):
        self.schema = schema  # protocol.json's "config" table
        self.apply = apply  # apply(values): puts a valid configuration in force
        self.report = report  # report(payload bytes): publishes on config/reported
        self.log = log
        self.path = path
        self.version = version  # the one in force; 0: nothing pushed yet, defaults
        self.values = {}

    def load(self):
        # At boot, before any connection: what was last applied.
        try:
            with open(self.path) as f:
                saved = json.load(f)
            values, error = validate(saved["config"], self.schema)
            if error:
                raise ValueError(error)
            self.version = int(saved["version"])
            self.values = values
            self.log("config: version %d from flash" % self.version)
        except OSError:
            pass  # never configured
        except (ValueError, KeyError, TypeError) as e:
            self.log("config: %s unreadable (%s); using defaults" % (self.path, e))
        self.apply(self.values)

    def receive(self, payload):
        if not payload:
            # An empty retained message clears the broker's copy; it pushes
            # nothing, so what is in force stays (the gateway publishes it again).
            self.log("config: none pushed (retained copy cleared); version %d stays in force" % self.version)
            return
        try:
            message = json.loads(payload)
            version = message["version"]
            raw = message["config"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError("version must be a positive integer")
        except Exception as e:  # not JSON, not UTF-8, fields missing or of the wrong type
            self.log("config: malformed message rejected: %r" % (e,))
            self._report(None, "rejected", "malformed config message: %s" % (e,))
            return
        if version <= self.version:
            if version == self.version:
                self._report(version, "applied", None)  # a retained copy after reconnect: still in sync
            return
        values, error = validate(raw, self.schema)
        if error:
            self.log("config: version %d rejected: %s" % (version, error))
            self._report(version, "rejected", error)
            return
        self.apply(values)
        self.version = version
        self.values = values
        try:
            dump_atomic(self.path, {"version": version, "config": values})
        except OSError as e:  # in force now, but not after a reboot: say so
            self.log("config: version %d applied but not saved: %s" % (version, e))
            self._report(version, "applied", "not saved on flash: %s" % (e,))
            return
        self.log("config: version %d applied" % version)
        self._report(version, "applied", None)

    def reject(self, error):
        # A message that could not even be read (too large for the heap).
        self._report(None, "rejected", error)

    def _report(self, version, status, error):
        self.report(json.dumps({"version": version, "status": status, "error": error, "applied": self.version}).encode())
