# Configuration on the board: validation, apply, persist, report.
import json

from config import Config, validate
from settings import load_protocol

SCHEMA = load_protocol()["config"]


class Board:
    def __init__(self, path="config.json"):
        self.applied = []
        self.reports = []
        self.config = Config(SCHEMA, self.applied.append, lambda p: self.reports.append(json.loads(p)), print, path)

    def push(self, version, config):
        self.config.receive(json.dumps({"version": version, "config": config}).encode())
        return self.reports[-1] if self.reports else None


def test_valid_configuration_is_applied_persisted_and_reported():
    board = Board()
    board.config.load()
    assert board.applied == [{}]  # defaults at boot when nothing was pushed
    report = board.push(3, {"telemetry_interval_ms": 500, "led": True})
    assert report == {"version": 3, "status": "applied", "error": None, "applied": 3}
    assert board.applied[-1] == {"telemetry_interval_ms": 500, "led": True}
    rebooted = Board()
    rebooted.config.load()
    assert rebooted.config.version == 3 and rebooted.applied == [{"telemetry_interval_ms": 500, "led": True}]


def test_invalid_configuration_is_rejected_and_the_previous_stays():
    board = Board()
    board.push(1, {"led": True})
    for bad, words in (
        ({"telemetry_interval_ms": 5}, "telemetry_interval_ms: must be from 10"),
        ({"led": "yes"}, "led: must be true or false"),
        ({"colour": 1}, "colour: unknown key"),
        ({"log_level": "loud"}, "log_level: must be one of"),
        ([1, 2], "must be a JSON object"),
    ):
        report = board.push(2, bad)
        assert report["status"] == "rejected" and report["version"] == 2 and report["applied"] == 1, report
        assert words in report["error"], (words, report)
    assert board.config.version == 1 and board.applied[-1] == {"led": True}
    assert Board().config.version == 0  # nothing read yet
    again = Board()
    again.config.load()
    assert again.config.version == 1


def test_old_versions_are_ignored_and_the_current_one_is_confirmed():
    board = Board()
    board.push(5, {"led": True})
    count = len(board.applied)
    board.reports.clear()
    board.push(4, {"led": False})
    assert board.reports == [] and len(board.applied) == count
    assert board.push(5, {"led": True}) == {"version": 5, "status": "applied", "error": None, "applied": 5}
    assert len(board.applied) == count  # confirmed, not applied twice


def test_malformed_messages_are_rejected_with_a_reason():
    board = Board()
    for payload in (b"not json", b"\xff\xfe", b"[]", b'{"version": "1", "config": {}}', b'{"config": {}}', b'{"version": 0, "config": {}}'):
        board.config.receive(payload)
        report = board.reports[-1]
        assert report["status"] == "rejected" and report["version"] is None and report["error"], (payload, report)
    assert board.config.version == 0


def test_a_cleared_retained_copy_is_no_configuration_and_the_one_in_force_stays():
    lines = []
    board = Board()
    board.config.log = lines.append
    board.push(4, {"led": True})
    count, reports = len(board.applied), len(board.reports)
    board.config.receive(b"")
    assert board.config.version == 4 and board.applied[-1] == {"led": True} and len(board.applied) == count
    assert len(board.reports) == reports  # not reported as malformed
    assert lines[-1] == "config: none pushed (retained copy cleared); version 4 stays in force", lines


def test_a_corrupt_config_file_falls_back_to_defaults():
    with open("config.json", "w") as f:
        f.write('{"version": 3, "config": {"led": "on"}}')
    board = Board()
    board.config.load()
    assert board.config.version == 0 and board.applied == [{}]


def test_validate_returns_the_first_problem():
    assert validate({"led": False}, SCHEMA) == ({"led": False}, None)
    assert validate({"display": "x" * 200}, SCHEMA)[1].startswith("display: must be")
