# Remote commands: fleet/<id>/cmd carries {"id", "name", "args", "expires"};
# the board answers on fleet/<id>/cmd/result with {"id", "status", ...}.
#
# At most once, across redelivery and reboots: a command's id is written to
# flash (commands.jsonl, replaced atomically) before it runs, with its result
# once it has one (a short one; a long one is replaced by a note). A
# command that comes again is not run again: its stored result is sent
# again, or "failed: interrupted" when the board rebooted while it ran. The
# file keeps the last KEEP ids, one [id, status, outcome] per line, and is
# the only copy: it is searched when a command comes, so the kept commands
# cost the heap nothing between commands (32 of them held 4 KB as text).
#
# Adding a command is one function: cmd_<name>(device, args) returning a
# JSON-able result, raising Rejected for bad arguments or Failed when it
# could not be done.
import gc
import json
import os

from state import stream_atomic

COMMANDS_FILE = "commands.jsonl"
KEEP = 32
_KEPT_OUTCOME = 96  # characters of JSON


def _prefix(command_id):
    # How the line of a command's entry begins: '["<id>",'.
    return "[%s," % json.dumps(command_id)


def _is_entry(line):
    # A whole line of the file: a torn or foreign one is not.
    return line.startswith('["') and line.endswith("]\n")


class Rejected(Exception):
    pass


class Failed(Exception):
    pass


def _int_arg(args, name, low, high, default):
    value = args.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise Rejected("%s must be an integer from %d to %d" % (name, low, high))
    return value


# -- the built-in commands -------------------------------------------------------
def cmd_ping(device, args):
    return "pong"


def cmd_info(device, args):
    return device.info()


def cmd_blink(device, args):
    times = _int_arg(args, "times", 1, 20, 3)
    device.blink(times)
    return {"times": times}


def cmd_display(device, args):
    text = args.get("text")
    if not isinstance(text, str) or len(text) > 128:
        raise Rejected("text must be a string of at most 128 characters")
    device.show(text)
    return {"shown": text}


def cmd_flush(device, args):
    return {"backlog": device.flush()}


def cmd_reboot(device, args):
    device.reboot()  # after the result is out: see Commands.run
    return "rebooting"


COMMANDS = {
    "ping": cmd_ping,
    "info": cmd_info,
    "blink": cmd_blink,
    "display": cmd_display,
    "flush": cmd_flush,
    "reboot": cmd_reboot,
}


class Commands:
    def __init__(self, device, report, log, path=COMMANDS_FILE):
        self.device = device
        self.report = report  # report(payload bytes): publishes on cmd/result
        self.log = log
        self.path = path
        self.current = None  # the id of the command being handled
        self.others = 0  # entries of other commands in the file (_find)

    def _open(self):
        # The file, to be read a line at a time, or None when there is none
        # yet. No generator over it: a generator's frame is one of the
        # larger blocks a command would ask a fragmented heap for.
        try:
            return open(self.path)
        except OSError:
            return None

    def _find(self, command_id):
        # [id, status, outcome] of a command seen, from the file, or None;
        # counts the other commands' entries for _write.
        prefix = _prefix(command_id)
        found = None
        self.others = 0
        f = self._open()
        if f is not None:
            with f:
                for line in f:
                    if _is_entry(line):
                        if line.startswith(prefix):
                            found = line
                        else:
                            self.others += 1
        try:
            return None if found is None else json.loads(found)
        except ValueError:
            return None  # a bad line: not seen

    def _remember(self, command_id, status, outcome):
        # Only a short outcome is kept for a redelivery to repeat: the full
        # one went out with the result, and 32 `info` results would rewrite
        # kilobytes of flash per command.
        if outcome is not None and not isinstance(outcome, (int, float, bool)):
            text = json.dumps(outcome)
            if len(text) > _KEPT_OUTCOME:
                outcome = "(%d bytes of JSON, not kept)" % len(text)
        entry = json.dumps([command_id, status, outcome])
        stream_atomic(self.path, lambda f: self._write(f, _prefix(command_id), entry))

    def _write(self, f, prefix, entry):
        # The new file: the kept entries but this command's, the oldest
        # ones dropped to keep KEEP in all (_find counted them), then this
        # command's entry. Bad lines are left behind.
        skip = self.others - (KEEP - 1)
        old = self._open()
        if old is not None:
            with old:
                for line in old:
                    if not _is_entry(line) or line.startswith(prefix):
                        continue
                    if skip > 0:
                        skip -= 1
                        continue
                    f.write(line)
        self.others = min(self.others, KEEP - 1)
        f.write(entry)
        f.write("\n")

    def reject(self, error):
        # A message that could not even be read (too large for the heap).
        self._send(None, "rejected", error)

    def _send(self, command_id, status, outcome):
        message = {"id": command_id, "status": status}
        if status in ("succeeded", "delivered"):
            message["result"] = outcome
        else:
            message["error"] = outcome
        self.report(json.dumps(message).encode())

    def receive(self, payload, now_s):
        # now_s: the board's clock in unix seconds, or None before it is set.
        try:
            self._receive(payload, now_s)
        except MemoryError:
            # Out of heap mid-way: say so with a message that needs little,
            # so the command is never left "delivered" for ever.
            gc.collect()
            command_id = self.current
            self.log("cmd %s: out of memory" % command_id)
            if command_id is not None:
                self._send(command_id, "failed", "out of memory on the board")

    def _receive(self, payload, now_s):
        self.current = None
        try:
            message = json.loads(payload)
            command_id = message["id"]
            name = message["name"]
            args = message.get("args")
            if args is None:
                args = {}
            expires = message.get("expires")
            if not isinstance(command_id, str) or not 1 <= len(command_id) <= 64:
                raise ValueError("id must be a string of 1 to 64 characters")
            if not isinstance(name, str) or not isinstance(args, dict):
                raise ValueError("name must be a string and args an object")
            if expires is not None and not isinstance(expires, (int, float)):
                raise ValueError("expires must be a number")
        except Exception as e:
            self.log("cmd: malformed message rejected: %r" % (e,))
            self._send(None, "rejected", "malformed command message: %s" % (e,))
            return
        self.current = command_id
        seen = self._find(command_id)
        if seen is not None:
            # Redelivered (a lost PUBACK, a reconnect): never run twice.
            status, outcome = seen[1], seen[2]
            if status == "running":
                status, outcome = "failed", "interrupted: the board restarted while it ran"
                self._remember(command_id, status, outcome)
            self._send(command_id, status, outcome)
            return
        function = COMMANDS.get(name)
        if function is None:
            self._finish(command_id, "rejected", "unknown command %r (known: %s)" % (name, ", ".join(sorted(COMMANDS))))
            return
        if expires is not None and now_s is not None and now_s > expires:
            self._finish(command_id, "expired", "expired %d s before it arrived" % int(now_s - expires))
            return
        self._remember(command_id, "running", None)  # before running: at most once
        self._send(command_id, "delivered", None)
        try:
            result = function(self.device, args)
            status, outcome = "succeeded", result
        except Rejected as e:
            status, outcome = "rejected", str(e)
        except Exception as e:  # Failed, or a bug in a command: reported, the board goes on
            status, outcome = "failed", str(e) or repr(e)
        self._finish(command_id, status, outcome)

    def _finish(self, command_id, status, outcome):
        self.log("cmd %s: %s" % (command_id, status))
        self._remember(command_id, status, outcome)
        try:
            self._send(command_id, status, outcome)
        except MemoryError:
            # It ran: "failed" would be untrue, and could make someone run
            # it again. What was kept is short (or a note saying the result
            # was too long to keep), and is what a redelivery gets too.
            gc.collect()
            self.log("cmd %s: out of memory for its result; sending what was kept" % command_id)
            self._send(command_id, status, self._find(command_id)[2])
