"""Every mistake a user can make with `fleet` ends in one sentence on stderr,
exit code 2 for usage and 1 for a failure, never a traceback."""
from __future__ import annotations

import asyncio
import socket
import time

import nats
import nats.js.errors
import pytest
from support import GatewayThread

from fleet.cli.main import main
from fleet.protocol import DEVICES_BUCKET
from fleet.broker.server import NatsServer
from fleet.wire import DeviceRecord


def free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str, *words: str) -> None:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err


def put_record(server: NatsServer, record: DeviceRecord) -> None:
    """A registry record as the gateway writes it: a board it has heard of."""
    async def put() -> None:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        try:
            kv = await js.key_value(DEVICES_BUCKET)  # the gateway's, when one runs
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(bucket=DEVICES_BUCKET)
        await kv.put(record.id, record.to_bytes())
        await nc.close()

    asyncio.run(put())


@pytest.mark.parametrize("argv, words", [
    (["cmd", "send", "sim-001", "blink", "not-json"], ["ARGS must be a JSON object"]),
    (["cmd", "send", "sim-001", "blink", "[1, 2]"], ["ARGS must be a JSON object"]),
    (["cmd", "send", "sim-001", "blink", "--ttl", "5x"], ["'5x' is not a duration"]),
    (["cmd", "send", "sim-001", "blink", "{}", "extra"], ["unexpected 'extra'"]),
    (["cmd", "send", "--group", "g", "--all", "ping"], ["exactly one target"]),
    (["config", "set", "sim-001"], ["nothing to set"]),
    (["config", "set", "sim-001", "no-equals-sign"], []),
    (["config", "set", "sim-001", "--group", "g", "led=on"], []),
    (["cmd", "send"], ["the following arguments are required", "--help"]),
    (["cmd", "status", "c-1", "--bogus"], ["unrecognized arguments: --bogus"]),
    (["display", "bad id!", "hello"], ["invalid device id"]),
    (["display", "sim-001", "x" * 300], ["too long"]),
])
def test_usage_mistakes_exit_2_with_one_sentence(
    server: NatsServer, capsys: pytest.CaptureFixture[str], argv: list[str], words: list[str]
) -> None:
    try:
        code, _, err = run(capsys, *argv, "--nats", server.url)
    except SystemExit as exit:  # argparse's own checks
        code, err = int(exit.code or 0), capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("fleet")
    one_line(err, *words)


def test_a_bad_filter_is_shown_with_where_it_went_wrong(server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "query", "--where", "temp >", "--nats", server.url)
    assert code == 2 and "Traceback" not in err
    assert err.splitlines() == ["fleet query: expected a value (a number, a \"string\", a word, true or false),"
                                " found the end at position 7:", "  temp >", "        ^"]


@pytest.mark.parametrize("argv", [
    ["devices", "--timeout", "2"],
    ["config", "get", "sim-001"],
    ["config", "set", "--all", "led=on"],
    ["config", "history", "--all"],
    ["cmd", "send", "sim-001", "ping"],
    ["cmd", "status", "c-1"],
    ["cmd", "list", "sim-001"],
    ["display", "sim-001", "hi"],
    ["query"],
])
def test_no_server_is_one_sentence_and_the_password_is_never_shown(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    url = f"nats://fleetuser:s3cret@127.0.0.1:{free_closed_port()}"
    code, _, err = run(capsys, *argv, "--nats", url)
    assert code == 1
    one_line(err, "cannot reach the NATS server", "fleetuser:***@")
    assert "s3cret" not in err


@pytest.mark.parametrize("argv, words", [
    (["cmd", "send", "sim-999", "ping"], ["unknown device sim-999", "--force"]),
    (["cmd", "send", "--wait", "--timeout", "1", "sim-999", "ping"], ["unknown device sim-999"]),
    (["cmd", "list", "sim-999"], ["unknown device sim-999"]),
    (["cmd", "status", "nosuchid"], ["no command nosuchid"]),
    (["cmd", "send", "--group", "nobody", "ping"], ["no known device is in group nobody"]),
    (["config", "get", "sim-999"], ["unknown device sim-999"]),
    (["config", "set", "sim-999", "led=on"], ["unknown device sim-999", "--force"]),
    (["config", "history", "sim-999"], ["unknown device sim-999"]),
    (["display", "sim-999", "hello"], ["unknown device sim-999"]),
])
def test_unknown_ids_are_refused_by_every_command_that_names_one(
    server: NatsServer, capsys: pytest.CaptureFixture[str], argv: list[str], words: list[str]
) -> None:
    put_record(server, DeviceRecord(id="sim-001", online=True))
    code, out, err = run(capsys, *argv, "--nats", server.url)
    assert code == 1 and out == ""
    one_line(err, *words)


def test_forced_commands_and_configuration_are_kept_with_a_note_when_no_gateway_runs(
    server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "cmd", "send", "--force", "sim-new", "ping", "--nats", server.url)
    assert code == 0 and "sim-new  ping  queued" in out
    one_line(err, "no fleet gateway is running", "queued")

    code, out, err = run(capsys, "config", "set", "--force", "sim-new", "led=on", "--nats", server.url)
    assert code == 0 and "device sim-new: version 1" in out
    one_line(err, "no fleet gateway is running")
    # Set on purpose, so it can be read back although no board has connected.
    code, out, _ = run(capsys, "config", "get", "sim-new", "--nats", server.url)
    assert code == 0 and '"led": true' in out

    code, _, err = run(capsys, "config", "set", "--group", "lab", "led=off", "--nats", server.url)
    assert code == 0 and "no known device is in group lab" in err


def test_a_wait_that_runs_out_says_the_board_is_offline_and_since_when(
    server: NatsServer, gateway: GatewayThread, capsys: pytest.CaptureFixture[str]
) -> None:
    put_record(server, DeviceRecord(id="sim-050", online=False, since=time.time() - 125))
    code, out, err = run(capsys, "cmd", "send", "sim-050", "ping", "--wait", "--timeout", "1", "--nats", server.url)
    assert code == 1 and "sim-050  ping  " in out
    one_line(err, "still", "after 1 s", "sim-050 is offline since 2m ago", "when it reconnects")


def test_no_gateway_is_named_by_query_and_by_a_wait(server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "query", "--timeout", "0.2", "--nats", server.url)
    assert code == 0 and "0 matching" in err and "no fleet gateway is running" in err

    put_record(server, DeviceRecord(id="sim-001", online=True))
    code, _, err = run(capsys, "cmd", "send", "sim-001", "ping", "--wait", "--timeout", "0.5", "--nats", server.url)
    assert code == 1
    assert "no fleet gateway is running to deliver it" in err and "Traceback" not in err
