"""Contexts: every command finds the server the way the `nats` CLI does,
first match wins: --nats, $FLEET_NATS_URL, --context, $FLEET_CONTEXT, the
selected context, the default."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleet.broker import context as contexts
from fleet.cli.main import build_parser, main


def resolved(*argv: str) -> str:
    args = build_parser().parse_args(list(argv))
    contexts.apply_context(args)
    return str(args.nats)


def test_the_order_is_flag_env_context_flag_env_context_selected_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolved("devices") == "nats://127.0.0.1:4222"
    contexts.save(contexts.Context(name="lab", nats_url="nats://lab:4222"), selected=True)
    contexts.save(contexts.Context(name="edge", nats_url="nats://edge:4222"))
    assert resolved("devices") == "nats://lab:4222"
    monkeypatch.setenv("FLEET_CONTEXT", "edge")
    assert resolved("devices") == "nats://edge:4222"
    folder = tmp_path / "data"
    contexts.record(folder, "sim", "nats://sim:4222", "127.0.0.1:1883", "fleet sim")
    assert resolved("devices", "--context", str(folder)) == "nats://sim:4222"  # a data folder
    assert resolved("config", "get", "sim-001", "--context", "edge") == "nats://edge:4222"
    monkeypatch.setenv("FLEET_NATS_URL", "nats://env:4222")
    assert resolved("devices", "--context", "edge") == "nats://env:4222"
    assert resolved("cmd", "list", "x", "--nats", "nats://flag:4222") == "nats://flag:4222"


def test_the_gateway_takes_its_mqtt_listener_from_the_context() -> None:
    contexts.save(contexts.Context(name="lab", nats_url="nats://lab:4222", mqtt="lab:11883"), selected=True)
    args = build_parser().parse_args(["gateway"])
    contexts.apply_context(args)
    assert (args.nats, args.mqtt) == ("nats://lab:4222", "lab:11883")
    args = build_parser().parse_args(["gateway", "--mqtt", "other:1883"])
    contexts.apply_context(args)
    assert args.mqtt == "other:1883"


def test_fleet_context_lists_adds_uses_shows_and_removes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["context"]) == 0 and "no contexts yet" in capsys.readouterr().out
    assert main(["context", "add", "lab", "--nats", "nats://u:secret@lab:4222", "--mqtt", "lab:1883"]) == 0
    assert main(["context", "use", "lab"]) == 0
    capsys.readouterr()
    assert main(["context"]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith("* lab  nats://u:***@lab:4222  mqtt lab:1883") and "secret" not in listing
    assert main(["context", "show"]) == 0 and json.loads(capsys.readouterr().out)["mqtt"] == "lab:1883"
    assert main(["context", "rm", "lab"]) == 0 and contexts.selected_name() is None


@pytest.mark.parametrize("argv, words, code", [
    (["context", "use", "nosuch"], "no context nosuch", 1),
    (["context", "add", "lab"], "add needs a name and --nats URL", 2),
    (["context", "add", "bad name!", "--nats", "nats://x:1"], "invalid context name", 2),
    (["devices", "--context", "nosuch"], "no context nosuch", 1),
    (["devices", "--context", "/nowhere/context.json"], "no fleet context at", 1),
])
def test_context_mistakes_are_one_sentence(
    capsys: pytest.CaptureFixture[str], argv: list[str], words: str, code: int
) -> None:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_a_broken_context_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "context.json"
    broken.write_text("{not json")
    assert main(["devices", "--context", str(broken)]) == 2
    assert "is not a fleet context" in capsys.readouterr().err
