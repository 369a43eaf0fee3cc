"""The errors a user can run into: each says what went wrong in one sentence.

The CLI catches FleetError in one place (cli.main) and prints its message
without a traceback; `exit_code` is 2 for a usage mistake, 1 for a failure.
Library code raises the subclass that names the kind of failure so that
programs can tell them apart.
"""
from __future__ import annotations


class FleetError(Exception):
    """Something the user can act on; the message is one sentence."""

    exit_code = 1


class UsageError(FleetError, ValueError):
    """The command line or a request is wrong: bad JSON, bad duration, no target."""

    exit_code = 2


class NotFound(FleetError, LookupError):
    """An id that names nothing: unknown device, command or configuration version."""


class Unavailable(FleetError, ConnectionError):
    """A part that should be running is not: the NATS server, the gateway, the MQTT listener."""


class Refused(FleetError):
    """The server or the gateway said no: a JetStream error, a version conflict."""


class TimedOut(FleetError, TimeoutError):
    """A wait ran out; the message says what was still missing."""


__all__ = ["FleetError", "NotFound", "Refused", "TimedOut", "Unavailable", "UsageError"]
