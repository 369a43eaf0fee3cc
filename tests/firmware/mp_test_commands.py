# Remote commands on the board: at most once, results, rejections, expiry.
import json

from commands import KEEP, Commands


class FakeDevice:
    def __init__(self):
        self.blinks = []
        self.shown = []
        self.reboot_requested = False

    def blink(self, times):
        self.blinks.append(times)

    def flush(self):
        return 0

    def reboot(self):
        self.reboot_requested = True

    def show(self, text):
        self.shown.append(text)

    def info(self):
        return {"id": "heap-1", "board": "sim", "heap_free": 61952, "backlog": 0, "online": True}


class Board:
    def __init__(self):
        self.device = FakeDevice()
        self.sent = []
        self.commands = Commands(self.device, lambda p: self.sent.append(json.loads(p)), print)

    def run(self, command_id, name, args=None, expires=None, now=1000.0):
        message = {"id": command_id, "name": name, "args": args or {}, "expires": expires}
        self.commands.receive(json.dumps(message).encode(), now)
        return self.sent[-1]


def test_a_command_is_delivered_then_succeeds_with_its_result():
    board = Board()
    assert board.run("c1", "ping") == {"id": "c1", "status": "succeeded", "result": "pong"}
    assert [m["status"] for m in board.sent] == ["delivered", "succeeded"]


def test_a_redelivered_command_is_not_run_again_even_after_a_reboot():
    board = Board()
    board.run("c1", "blink", {"times": 2})
    assert board.device.blinks == [2]
    again = board.run("c1", "blink", {"times": 2})
    assert again == {"id": "c1", "status": "succeeded", "result": {"times": 2}}
    rebooted = Board()  # a new Commands finds it in commands.jsonl
    rebooted.run("c1", "blink", {"times": 2})
    assert rebooted.device.blinks == [] and rebooted.sent[-1]["status"] == "succeeded"


def test_a_command_interrupted_by_a_reboot_is_reported_failed_not_run_again():
    with open("commands.jsonl", "w") as f:
        f.write('["c9", "running", null]\n')
    board = Board()
    report = board.run("c9", "reboot")
    assert report["status"] == "failed" and "interrupted" in report["error"]
    assert not board.device.reboot_requested


def test_unknown_commands_and_bad_arguments_are_rejected_with_a_reason():
    board = Board()
    report = board.run("c1", "selfdestruct")
    assert report["status"] == "rejected" and "unknown command 'selfdestruct'" in report["error"]
    report = board.run("c2", "blink", {"times": 99})
    assert report["status"] == "rejected" and "times must be an integer from 1 to 20" in report["error"]
    report = board.run("c3", "display", {"text": 5})
    assert report["status"] == "rejected"
    assert board.device.blinks == [] and board.device.shown == []


def test_malformed_messages_are_rejected_and_nothing_runs():
    board = Board()
    for payload in (b"nope", b"\xff", b"[]", b'{"id": 5, "name": "ping"}', b'{"id": "x", "name": "ping", "args": []}', b'{"name": "ping"}'):
        board.commands.receive(payload, 1000.0)
        assert board.sent[-1]["status"] == "rejected" and board.sent[-1]["id"] is None, payload
    assert len(board.sent) == 6


def test_an_expired_command_is_never_run():
    board = Board()
    report = board.run("c1", "blink", {"times": 1}, expires=999.0, now=1000.0)
    assert report["status"] == "expired" and board.device.blinks == []
    report = board.run("c2", "blink", {"times": 1}, expires=999.0, now=None)  # clock not set: cannot tell
    assert report["status"] == "succeeded"


def test_reboot_is_requested_after_the_result_and_only_once():
    board = Board()
    assert board.run("r1", "reboot")["status"] == "succeeded"
    assert board.device.reboot_requested
    rebooted = Board()
    rebooted.run("r1", "reboot")
    assert not rebooted.device.reboot_requested


def test_the_remembered_ids_are_bounded():
    board = Board()
    for i in range(KEEP + 10):
        board.run("c%d" % i, "ping")
    with open("commands.jsonl") as f:
        kept = [json.loads(line)[0] for line in f]
    assert kept == ["c%d" % i for i in range(10, KEEP + 10)], kept
    board.run("c0", "ping")
    assert board.device.blinks == [] and board.sent[-2]["status"] == "delivered"  # forgotten: run again


def test_a_long_result_is_sent_whole_but_only_a_note_of_it_is_kept():
    import commands

    commands.COMMANDS["big"] = lambda device, args: {"text": "x" * 500}
    try:
        board = Board()
        assert board.run("c9", "big")["result"] == {"text": "x" * 500}
        with open("commands.jsonl") as f:
            kept = f.read()
        assert "xxxxx" not in kept and "not kept" in kept
        again = board.run("c9", "big")  # redelivered: not run again, the note comes back
        assert again["status"] == "succeeded" and "not kept" in again["result"]
    finally:
        del commands.COMMANDS["big"]


def test_a_result_that_finds_no_heap_goes_out_as_what_was_kept_not_as_failed():
    # The command ran; its full result could not be sent (a big result on a
    # fragmented heap). "failed" would be untrue and invite running it
    # again: the short outcome kept on flash goes out instead.
    import commands

    commands.COMMANDS["big"] = lambda device, args: {"text": "x" * 500}
    board = Board()
    sent = board.sent
    refused = []

    def report(payload):
        message = json.loads(payload)
        if message["status"] == "succeeded" and not refused:
            refused.append(message["id"])
            raise MemoryError("memory allocation failed, allocating 1208 bytes")
        sent.append(message)

    board.commands.report = report
    try:
        last = board.run("c7", "big")
    finally:
        del commands.COMMANDS["big"]
    assert refused == ["c7"]
    assert last["status"] == "succeeded" and last["result"] == "(512 bytes of JSON, not kept)", last
    assert board.run("c7", "big") == last  # a redelivery gets the same answer


def test_a_command_whose_every_answer_finds_no_heap_is_reported_failed_not_left_delivered():
    # The last resort: not even the kept outcome can be sent. receive()
    # must still answer, with the smallest message it has.
    board = Board()
    sent = board.sent
    refused = []

    def report(payload):
        message = json.loads(payload)
        if message["status"] == "succeeded" and len(refused) < 2:
            refused.append(message["id"])
            raise MemoryError("memory allocation failed, allocating 1208 bytes")
        sent.append(message)

    board.commands.report = report
    last = board.run("c7", "ping")
    assert refused == ["c7", "c7"]
    assert last == {"id": "c7", "status": "failed", "error": "out of memory on the board"}, last
    assert board.run("c8", "ping")["status"] == "succeeded"  # and it goes on

def test_the_kept_commands_cost_the_heap_nothing_between_commands():
    # They are on flash only. In the heap, 32 of them held 6 KB as parsed
    # entries on the unix port, then 4 KB as JSON text.
    import gc

    board = Board()
    shapes = [("info", {}), ("display", {"text": "heap test"}), ("blink", {"times": 2}), ("ping", {})]
    board.run("c-first", "ping")
    board.sent.clear()
    gc.collect()
    before = gc.mem_alloc()
    for i in range(KEEP + 8):
        name, args = shapes[i % 4]
        board.run("c%015x" % i, name, args)
    board.sent.clear()
    board.device.blinks.clear()
    board.device.shown.clear()
    gc.collect()
    held = gc.mem_alloc() - before
    assert held < 256, held
    assert board.run("c%015x" % (KEEP + 7), "ping")["result"] == "pong"  # still known: redelivered, not run


def test_an_id_that_begins_another_is_not_taken_for_it():
    board = Board()
    board.run("c1", "blink", {"times": 1})
    assert board.run('c1"', "blink", {"times": 2}) == {"id": 'c1"', "status": "succeeded", "result": {"times": 2}}
    assert board.run("c10", "blink", {"times": 3}) == {"id": "c10", "status": "succeeded", "result": {"times": 3}}
    assert board.device.blinks == [1, 2, 3]
    assert board.run("c1", "blink", {"times": 9})["result"] == {"times": 1}  # redelivered: the kept result


def test_a_commands_file_with_bad_entries_keeps_the_good_ones():
    with open("commands.jsonl", "w") as f:
        f.write('["c1", "succeeded", "pong"]\n7\n["c2"\n[3, "failed", null]\n["c4", "failed", "x"]\n')
    board = Board()
    assert board.run("c4", "ping") == {"id": "c4", "status": "failed", "error": "x"}
    assert board.run("c1", "ping") == {"id": "c1", "status": "succeeded", "result": "pong"}
    board.run("c5", "ping")  # the file is written again: the good entries stay, the bad ones go
    with open("commands.jsonl") as f:
        assert [json.loads(line)[0] for line in f] == ["c1", "c4", "c5"]

