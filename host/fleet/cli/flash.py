"""`fleet flash` and `fleet provision`: putting the firmware and a board's
settings onto a board."""
from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from pathlib import Path

from fleet.boards.flash import BOARDS, FlashError, describe, flash
from fleet.paths import BUILD_DIR
from fleet.boards.provision import ProvisionError, build_settings, parse_setting, read_secrets, redacted, write_settings


def cmd_flash(args: argparse.Namespace) -> int:
    def progress(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    try:
        report = flash(
            args.board, args.port, Path(args.settings) if args.settings else None, args.index, progress, args.verbose,
            romfs=args.romfs,
        )
    except FlashError as error:
        print(f"fleet flash: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(describe(report)))
    else:
        print("done: watch the console with `mpremote connect %s repl`" % args.port)
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    values: dict[str, object] = {}
    try:
        for assignment in args.set or []:
            key, value = parse_setting(assignment)
            values[key] = value
        for key in ("wifi_ssid", "mqtt_host", "mqtt_port", "mqtt_user"):
            given = getattr(args, key)
            if given is not None:
                values[key] = given
        if args.group:
            values["groups"] = args.group
        ask = (lambda prompt: getpass.getpass(prompt)) if args.ask and sys.stdin.isatty() else None
        values.update(read_secrets(os.environ, ask))
        settings = build_settings(args.device, values)
    except ProvisionError as error:
        print(f"fleet provision: {error}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else BUILD_DIR / "provision" / args.device / "settings.json"
    write_settings(out, settings)
    print(json.dumps(redacted(settings), indent=1))
    print(f"written to {out} (owner-only); flash it with: fleet flash --board BOARD --port PORT --settings {out}",
          file=sys.stderr)
    return 0


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    help = "compile the firmware and copy it, its dependencies and settings to a board with mpremote"
    p = sub.add_parser("flash", help=help, description=help)
    p.add_argument("--board", required=True, choices=BOARDS, help="the board profile (sim: a virtual board)")
    p.add_argument("--port", required=True,
                   help="mpremote's device: /dev/ttyACM0, COM3, or socket://127.0.0.1:PORT for a virtual board")
    p.add_argument("--settings", metavar="FILE", help="settings.json to copy (see fleet provision)")
    p.add_argument("--index", metavar="URL", help="mip package index (default: micropython.org's)")
    p.add_argument("--json", action="store_true", help="print what was done as JSON")
    p.add_argument("--verbose", action="store_true", help="show mpremote's own output")
    p.add_argument("--romfs", action="store_true",
                   help="put the firmware in the board's ROM partition (MicroPython 1.25+ built with ROMFS): "
                        "it runs in place and takes far less heap")
    p.set_defaults(func=cmd_flash)

    help = "write a board's settings.json (secrets from $FLEET_WIFI_PASSWORD / $FLEET_MQTT_PASSWORD or asked)"
    p = sub.add_parser("provision", help=help, description=help)
    p.add_argument("device", help="the device id the board will use")
    p.add_argument("--wifi-ssid", dest="wifi_ssid")
    p.add_argument("--mqtt-host", dest="mqtt_host", help="the NATS server's MQTT listener")
    p.add_argument("--mqtt-port", dest="mqtt_port", type=int)
    p.add_argument("--mqtt-user", dest="mqtt_user")
    p.add_argument("--group", action="append", help="a group the board belongs to (repeatable)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other setting (repeatable)")
    p.add_argument("--ask", action="store_true", help="ask for secrets not in the environment, without echo")
    p.add_argument("--out", metavar="FILE", help="where to write (default: build/provision/DEVICE/settings.json)")
    p.set_defaults(func=cmd_provision)


__all__ = ["add_commands", "cmd_flash", "cmd_provision"]
