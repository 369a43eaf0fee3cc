# Small state that must survive power loss: boot count and the telemetry
# sequence. Written whole to a temporary file then renamed over the old one,
# which LittleFS (and POSIX in the simulator) makes atomic: a power cut
# leaves either the old or the new file, never a torn one.
import json
import os
from micropython import const

STATE_FILE = "state.json"
# Sequence numbers are reserved in blocks so that flash is written once per
# block, not once per reading; a reboot skips the unused rest of a block.
_SEQ_BLOCK = const(64)


def _replace(path, mode, write):
    # LittleFS makes the rename atomic: a reader (or a boot after a power
    # cut) sees the old file or the new one, never half.
    tmp = path + ".tmp"
    with open(tmp, mode) as f:
        write(f)
    os.rename(tmp, path)


def write_atomic(path, data):
    # Text or bytes.
    _replace(path, "wb" if isinstance(data, (bytes, bytearray)) else "w", lambda f: f.write(data))


def stream_atomic(path, write, binary=False):
    # What write(f) puts into the file piece by piece: text, or bytes.
    _replace(path, "wb" if binary else "w", write)


def dump_atomic(path, value):
    # A JSON value, streamed into the file by json.dump: never the whole
    # text in the heap at once.
    _replace(path, "w", lambda f: json.dump(value, f))


class DeviceState:
    def __init__(self, path=STATE_FILE):
        self.path = path
        self.boots = 0
        self.seq = 0  # next sequence number to hand out
        self.seq_limit = 0  # first number not covered by the persisted reservation
        self.warning = None  # a problem found at boot, for the console
        self.save_error = None  # why the last save failed, if it did
        try:
            with open(path) as f:
                saved = json.load(f)
            self.boots = int(saved["boots"])
            self.seq = int(saved["seq_next"])
        except OSError:
            pass  # first boot: no file yet
        except (ValueError, KeyError, TypeError):
            self.warning = "%s was unreadable; counters restart" % path

    def boot(self):
        self.boots += 1
        self._reserve()

    def next_seq(self):
        if self.seq >= self.seq_limit:
            self._reserve()
        seq = self.seq
        self.seq += 1
        return seq

    def _reserve(self):
        limit = self.seq + _SEQ_BLOCK
        try:
            write_atomic(self.path, '{"boots": %d, "seq_next": %d}' % (self.boots, limit))
        except OSError as e:
            # Full or failing flash: keep counting in RAM and try again at the
            # next reading, rather than stop recording.
            self.save_error = "%s not saved (%s)" % (self.path, e)
            return
        self.seq_limit = limit
        self.save_error = None
