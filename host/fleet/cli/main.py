"""`fleet`: operate the fleet. Thin: parse, call the library, print.

Every command finds the server through --nats URL, $FLEET_NATS_URL,
--context, $FLEET_CONTEXT or the selected context (context.py); listing
commands take --json for programs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from fleet.errors import FleetError, Refused, TimedOut, Unavailable, UsageError
from fleet.broker.connection import NatsUnavailable
from fleet.redact import redact_url

def cmd_server(args: argparse.Namespace) -> int:
    from fleet.broker.server import NatsServer, wait_for_signal

    from fleet.broker.context import record

    server = NatsServer(Path(args.data_dir), host=args.host, port=args.port, mqtt_port=args.mqtt_port)
    server.start()
    record(server.data_dir, args.context_name, server.url, f"{server.host}:{server.mqtt_port}", "fleet server")
    print(f"nats-server ready: NATS {server.url}  MQTT mqtt://{server.host}:{server.mqtt_port}")
    print(f"saved as context {args.context_name} (selected): other fleet commands find it by themselves")
    print(f"data and config in {server.data_dir} (log: {server.log_path}); Ctrl-C stops it")
    sys.stdout.flush()
    try:
        wait_for_signal()
    finally:
        server.stop()
        print("nats-server stopped")
    return 0


def _one_sentence(error: BaseException) -> FleetError | None:
    # Failures from the libraries below, in the words of the fleet; None:
    # a bug, which keeps its traceback.
    import nats.errors

    if isinstance(error, FleetError):
        return error
    if isinstance(error, nats.errors.NoRespondersError):
        return Unavailable("nobody answered: is the fleet gateway running? (`fleet gateway`)")
    if isinstance(error, nats.errors.TimeoutError):
        return TimedOut("the NATS server did not answer in time")
    if isinstance(error, (nats.errors.ConnectionClosedError, nats.errors.NoServersError)):
        return Unavailable(f"lost the NATS server ({type(error).__name__})")
    if isinstance(error, nats.errors.Error):
        return Refused(str(error) or type(error).__name__)
    return None


def cmd_gateway(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from fleet.gateway.service import Gateway, GatewayConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mqtt_host, _, mqtt_port = args.mqtt.rpartition(":")
    if not mqtt_port.isdigit() or not 0 < int(mqtt_port) < 65536:
        raise UsageError(f"--mqtt {args.mqtt!r}: expected HOST:PORT with a port from 1 to 65535")
    config = GatewayConfig(
        nats_url=args.nats,
        telemetry_max_age=args.telemetry_max_age,
        telemetry_max_bytes=args.telemetry_max_bytes,
        presence_history=args.presence_history,
        mqtt_host=mqtt_host.strip("[]") or "127.0.0.1",
        mqtt_port=int(mqtt_port),
        # The password from the environment only: a command line is visible to every user (ps).
        mqtt_username=args.mqtt_user,
        mqtt_password=os.environ.get("FLEET_MQTT_PASSWORD") if args.mqtt_user else None,
    )

    async def serve() -> None:
        gateway = Gateway(config)
        await gateway.start()
        print(f"fleet gateway running on {redact_url(config.nats_url)} (service {gateway.service_id}); Ctrl-C stops it")
        sys.stdout.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await gateway.stop()
            print("fleet gateway stopped")

    asyncio.run(serve())
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from fleet.state.inventory import fetch_devices, format_table

    records = asyncio.run(fetch_devices(args.nats, timeout=args.timeout))
    if args.json:
        print(json.dumps([record.to_json() for record in records], indent=2))
        return 0
    print(format_table(records) if records else "no devices yet")
    for line in asyncio.run(_gateway_health_lines(args.nats)):
        print(line)
    return 0


async def _gateway_health_lines(nats_url: str) -> list[str]:
    # Below the table: what each gateway can reach, so "in sync: no" has a visible cause.
    import time

    from fleet.state.inventory import fetch_health_over, format_age
    from fleet.broker.connection import connect

    nc = await connect(nats_url, name="fleet-devices")
    try:
        answers = await fetch_health_over(nc, 1.0)
    finally:
        await nc.close()
    lines = []
    for health in sorted(answers, key=lambda h: str(h.get("instance"))):
        mqtt = health.get("mqtt")
        if mqtt is None:
            state = "no MQTT listener given: configuration and commands are not sent"
        elif mqtt.get("connected"):
            state = f"MQTT {mqtt.get('address')} connected"
        else:
            since = mqtt.get("since")
            when = f" since {format_age(time.time() - since)}" if isinstance(since, (int, float)) else ""
            state = f"MQTT {mqtt.get('address')} DOWN{when}: {mqtt.get('error') or 'not connected'}"
        lines.append(f"gateway {health.get('instance')}: {state}")
    return lines


def cmd_tail(args: argparse.Namespace) -> int:
    import asyncio
    import json

    import time

    from fleet.state.commands import parse_duration
    from fleet.schema import id_problem
    from fleet.client.tail import DEFAULT_LAST, CsvTable, Reading, tail

    if args.device is not None and (problem := id_problem(args.device)):
        raise UsageError(problem)
    if args.last is not None and args.last < 0:
        raise UsageError(f"-n/--last must be 0 or more, got {args.last}")
    if args.count is not None and args.count < 1:
        raise UsageError(f"--count must be 1 or more, got {args.count}")
    since = None
    if args.since is not None:
        if (ago := parse_duration(args.since)) < 0:
            raise UsageError(f"--since must not be negative, got {args.since!r}")
        since = time.time() - ago
    # --count bounds a follow, as before -f existed; given alone it counts new readings.
    following = args.follow or args.count is not None
    if args.last is not None:
        last: int | None = args.last
    elif since is not None:
        last = None  # everything since then
    else:
        last = 0 if args.count is not None and not args.follow else DEFAULT_LAST

    table = CsvTable(sys.stdout, following) if args.csv else None

    def show(reading: Reading) -> None:
        if table is not None:
            table.add(reading)
        else:
            # Flushed per line: the output is often piped into another program.
            print(json.dumps(reading.to_json()) if args.json else reading.format_line(), flush=True)

    shown = asyncio.run(tail(args.nats, args.device, last=last, since=since, follow=following, limit=args.count,
                             on_reading=show, on_caught_up=table.caught_up if table is not None else None))
    if shown == 0 and not following and last != 0:
        window = f" in the last {args.since}" if args.since is not None else ""
        print(f"fleet tail: no readings stored for {args.device or 'any device'}{window}", file=sys.stderr)
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    import asyncio

    from fleet.sim.session import SimOptions, run_simulation

    options = SimOptions(devices=args.devices, data_dir=Path(args.data_dir), mqtt=args.mqtt, duration=args.duration,
                         port=args.port, mqtt_port=args.mqtt_port, context_name=args.context_name,
                         telemetry_interval_ms=int(args.interval * 1000), nicknames=args.nicknames)
    return asyncio.run(run_simulation(options))


def cmd_context(args: argparse.Namespace) -> int:
    import json

    from fleet.broker import context as contexts

    selected = contexts.selected_name()
    if args.action == "list":
        found = contexts.all_contexts()
        for context in found:
            print(contexts.describe(context, context.name == selected))
        if not found:
            print("no contexts yet: `fleet sim` or `fleet server` saves one, or `fleet context add NAME --nats URL`")
        return 0
    if args.action == "add":
        if not args.name or not args.nats_given:
            raise UsageError("add needs a name and --nats URL, e.g. fleet context add lab --nats nats://10.0.0.5:4222")
        contexts.save(contexts.Context(name=args.name, nats_url=args.nats_given, mqtt=args.mqtt))
        print(f"context {args.name} saved (`fleet context use {args.name}` selects it)")
        return 0
    name = args.name or (selected if args.action == "show" else None)
    if not name:
        raise UsageError(f"{args.action} needs a context name (`fleet context` lists them)")
    if args.action == "show":
        print(json.dumps(contexts.load(name).to_json(), indent=2))
    elif args.action == "use":
        contexts.select(name)
        print(f"using context {name}")
    else:
        contexts.remove(name)
        print(f"context {name} removed")
    return 0


def _check_one_target(args: argparse.Namespace) -> None:
    # `fleet config` and `fleet cmd` address a device, a group or the fleet.
    chosen = [name for name, given in (("DEVICE", args.device), ("--group", args.group), ("--all", args.all)) if given]
    if len(chosen) != 1:
        raise UsageError("name exactly one target: DEVICE, --group G or --all")


def _config_target(args: argparse.Namespace) -> str:
    from fleet.state.config import level_key

    _check_one_target(args)
    return level_key(device=args.device, group=args.group)


def cmd_config(args: argparse.Namespace) -> int:
    import asyncio
    import json
    from datetime import datetime

    from fleet.client import config as configcli
    from fleet.state.config import describe_level

    notes: list[str] = []
    if args.action == "get":
        view = asyncio.run(configcli.get_config(args.nats, args.device))
        print(json.dumps(view.to_json(), indent=2) if args.json else view.format())
        return 0
    if args.action == "set" and args.device and "=" in args.device:
        # `set --all led=on`: the optional DEVICE slot took the first assignment.
        args.assignments.insert(0, args.device)
        args.device = None
    key = _config_target(args)
    if args.action == "set":
        if not args.assignments:
            raise UsageError("nothing to set: give key=value (key= removes a key)")
        level = asyncio.run(configcli.set_config(args.nats, key, args.assignments, args.if_version,
                                                 force=args.force, notes=notes))
    elif args.action == "rollback":
        level = asyncio.run(configcli.rollback(args.nats, key, args.to, args.if_version))
    else:
        levels = asyncio.run(configcli.history(args.nats, key))
        if args.json:
            print(json.dumps([level.to_json() for level in levels], indent=2))
            return 0
        if not levels:
            print(f"{describe_level(key)}: no configuration yet")
        for level in levels:
            when = datetime.fromtimestamp(level.time).strftime("%Y-%m-%d %H:%M:%S") if level.time else "-"
            print(f"version {level.version}  {when}  {json.dumps(level.values, sort_keys=True)}")
        return 0
    if args.json:
        print(json.dumps(level.to_json(), indent=2))
    else:
        print(f"{describe_level(key)}: version {level.version} {json.dumps(level.values, sort_keys=True)}")
    for note in notes:
        print(f"fleet config: {note}", file=sys.stderr)
    return 0


def cmd_cmd(args: argparse.Namespace) -> int:
    import asyncio
    import json
    from dataclasses import asdict

    from fleet.client import commands as cmdcli
    from fleet.state.commands import parse_args, parse_duration

    if args.action == "send":
        # DEVICE NAME [ARGS] for one device; NAME [ARGS] with --group or --all.
        words = list(args.target)
        args.device = words.pop(0) if not (args.group or args.all) and len(words) >= 2 else None
        if not words:
            raise UsageError("which command? e.g. fleet cmd send sim-001 ping")
        args.name = words.pop(0)
        args.args = words.pop(0) if words else None
        if words:
            raise UsageError(f"unexpected {' '.join(words)!r}: ARGS is one JSON object")
    notes: list[str] = []
    if args.action == "send":
        _check_one_target(args)
        records = asyncio.run(cmdcli.send(
            args.nats, args.name, parse_args(args.args), device=args.device, group=args.group, everyone=args.all,
            ttl=parse_duration(args.ttl) if args.ttl else None, wait=args.timeout if args.wait else None,
            force=args.force, notes=notes,
        ))
    elif args.action == "status":
        records = [asyncio.run(cmdcli.status(args.nats, args.id))]
    else:
        records = asyncio.run(cmdcli.list_for(args.nats, args.device))
    if args.json:
        print(json.dumps([asdict(r) for r in records] if args.action != "status" else asdict(records[0]), indent=2))
    else:
        for record in records:
            print(cmdcli.format_record(record))
    for note in notes:
        print(f"fleet cmd: {note}", file=sys.stderr)
    if args.action == "send" and args.wait:
        return 0 if all(r.state == "succeeded" for r in records) else 1
    return 0


def cmd_display(args: argparse.Namespace) -> int:
    import asyncio

    from fleet.state.inventory import known_device
    from fleet.broker.connection import connect
    from fleet.protocol import nats_subject, topic_root
    from fleet.schema import id_problem

    text = sys.stdin.read() if args.text == "-" else args.text
    data = text.rstrip("\n").encode()
    if len(data) > 256:
        raise UsageError(f"{len(data)} bytes is too long: a display shows at most 16 x 8 characters")
    if args.device == "--all" or args.all:
        subject = f"{topic_root()}.display"
    elif (problem := id_problem(args.device)) is None:
        subject = nats_subject(args.device, "display")
    else:
        raise UsageError(problem)

    async def push() -> None:
        # A plain NATS publish: the MQTT listener delivers it to the board's
        # subscription (QoS 0, boards online now), as `nats pub` would.
        nc = await connect(args.nats, name="fleet-display")
        try:
            if subject != f"{topic_root()}.display":
                record = await known_device(nc.jetstream(), args.device)
                if record.online is False:
                    print(f"fleet display: {args.device} is offline: the text is not kept for it", file=sys.stderr)
            await nc.publish(subject, data)
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(push())
    return 0


def cmd_nickname(args: argparse.Namespace) -> int:
    import asyncio
    import json
    import os
    import signal

    import nats.errors

    from fleet.broker.connection import connect
    from fleet.state.inventory import known_device
    from fleet.state.nickname import NicknameService, ask, push
    from fleet.schema import id_problem

    if args.serve == bool(args.device or args.push) or (args.device and args.push):
        raise UsageError("give one of DEVICE, --push DEVICE or --serve")
    device = args.device or args.push
    if device is not None and (problem := id_problem(device)):
        raise UsageError(problem)

    async def run() -> int:
        nc = await connect(args.nats, name="fleet-nickname")
        try:
            if args.push:
                await known_device(nc.jetstream(), args.push)  # a name shown on no board helps nobody
                answer = await push(nc, args.push)
                print(f"{args.push}: {answer['nickname']} (from {answer['instance']})")
            elif args.serve:
                service = NicknameService(nc, args.instance or f"nickname-{os.getpid()}")
                await service.start()
                print(f"nickname instance {service.instance} serving; Ctrl-C stops it", flush=True)
                stop = asyncio.Event()
                for sig in (signal.SIGINT, signal.SIGTERM):
                    asyncio.get_running_loop().add_signal_handler(sig, stop.set)
                await stop.wait()
                await service.stop()
            else:
                print(json.dumps(await ask(nc, device)))
        except (TimeoutError, nats.errors.NoRespondersError):
            raise Unavailable("no nickname instance answered: start one with `fleet nickname --serve`") from None
        finally:
            await nc.close()
        return 0

    return asyncio.run(run())


def cmd_query(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from fleet.state.inventory import gateway_answers
    from fleet.broker.connection import connect
    from fleet.state.query import check_fields, parse_filter, scatter

    where = parse_filter(args.where or "")
    fields = check_fields([f.strip() for f in args.fields.split(",") if f.strip()]) if args.fields else None

    def show(found: dict[str, object]) -> None:
        # Printed as they arrive.
        if args.json:
            print(json.dumps(found), flush=True)
        else:
            values = "  ".join(f"{k}={json.dumps(v)}" for k, v in found["fields"].items())  # type: ignore[union-attr]
            print(f"{found['id']}  {values}", flush=True)

    async def run() -> int:
        nc = await connect(args.nats, name="fleet-query")
        try:
            outcome = await scatter(nc, where, fields, args.timeout, on_match=show)
            hint = ""
            if not outcome.online:
                # The online list comes from the registry, which only a gateway keeps.
                hint = ("; no board is online" if await gateway_answers(nc) else
                        "; no fleet gateway is running: it keeps the list of online boards (`fleet gateway`)")
        finally:
            await nc.close()
        summary = f"{len(outcome.matches)} matching, {len(outcome.answered)} answered, {len(outcome.online)} online"
        if outcome.missing:
            summary += f"; {len(outcome.missing)} online did not answer: {', '.join(outcome.missing)}"
        for device, error in sorted(outcome.errors.items()):
            print(f"{device}: error: {error}", file=sys.stderr)
        print(summary + hint, file=sys.stderr)
        return 0

    return asyncio.run(run())


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other error (subcommands inherit it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--nats", metavar="URL",
                       help="NATS server URL (default: $FLEET_NATS_URL, else the context's, else nats://127.0.0.1:4222)")
        p.add_argument("--context", metavar="NAME|PATH",
                       help="use this context (a name, a context.json or a data folder); default: $FLEET_CONTEXT or the selected one")
        return p

    p = command("server", "run nats-server with JetStream and the MQTT listener")
    p.add_argument("--data-dir", default="fleet-data", help="config, JetStream store and log (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback)")
    p.add_argument("--port", type=int, default=4222, help="NATS client port (-1: any free port)")
    p.add_argument("--mqtt-port", type=int, default=1883, help="MQTT port (-1: any free port)")
    p.add_argument("--context-name", default="server", metavar="NAME", help="save where it listens as this context (default: %(default)s)")
    p.set_defaults(func=cmd_server)

    p = command("gateway", "bridge the boards' MQTT topics to JetStream and serve the fleet API")
    p.add_argument("--telemetry-max-age", type=float, default=7 * 24 * 3600, metavar="SECONDS",
                   help="drop stored telemetry older than this (default: 7 days)")
    p.add_argument("--telemetry-max-bytes", type=int, default=1 << 30, metavar="BYTES",
                   help="cap on stored telemetry, oldest dropped first (default: 1 GiB)")
    p.add_argument("--presence-history", type=int, default=16, metavar="N",
                   help="status messages kept per device (default: %(default)s)")
    p.add_argument("--mqtt", metavar="HOST:PORT",
                   help="the server's MQTT listener, for retained configuration (default: %(default)s)")
    p.add_argument("--mqtt-user", metavar="NAME",
                   help="user name for the MQTT listener; the password is read from $FLEET_MQTT_PASSWORD")
    p.set_defaults(func=cmd_gateway)

    p = command("devices", "list the devices with presence and last-seen time")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the gateway (default: %(default)s)")
    p.set_defaults(func=cmd_devices)

    p = command("tail", "print the latest stored telemetry, like tail(1); -f follows new readings")
    p.add_argument("device", nargs="?", help="only this device")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="one JSON object per line")
    shape.add_argument("--csv", action="store_true",
                       help="CSV with a header: device, seq, time, the fields (new ones, when following, in `extra`)")
    p.add_argument("-n", "--last", type=int, metavar="N",
                   help="the N latest stored readings (default: 10; with --since, all since then)")
    p.add_argument("-f", "--follow", action="store_true", help="then keep printing new readings as they are stored")
    p.add_argument("--since", metavar="DURATION", help="only readings stored in the last DURATION (30s, 10m, 2h, 1d)")
    p.add_argument("--count", type=int, metavar="N",
                   help="stop after N readings, waiting for new ones if need be (alone: the next N new readings)")
    p.set_defaults(func=cmd_tail)

    p = command("config", "desired configuration: set, get, history, rollback")
    actions = p.add_subparsers(dest="action", required=True)

    def config_action(name: str, help: str, device_only: bool = False) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help, description=help)
        a.add_argument("--nats", default=argparse.SUPPRESS, metavar="URL", help="NATS server URL")
        a.add_argument("--context", default=argparse.SUPPRESS, metavar="NAME|PATH", help="use this context")
        a.add_argument("--json", action="store_true", help="print JSON")
        if device_only:
            a.add_argument("device", help="device id")
        else:
            a.add_argument("device", nargs="?", help="one device")
            a.add_argument("--group", help="every device in this group")
            a.add_argument("--all", action="store_true", help="the whole fleet")
        a.set_defaults(func=cmd_config)
        return a

    a = config_action("set", "change keys at one level (key=value; key= removes it)")
    a.add_argument("assignments", nargs="*", metavar="key=value")
    a.add_argument("--if-version", type=int, metavar="N", help="refuse unless the level is at version N")
    a.add_argument("--force", action="store_true", help="set a device level for a device that has never connected")
    config_action("get", "desired, reported and in sync, for one device", device_only=True)
    config_action("history", "every version of one level")
    a = config_action("rollback", "make an earlier version of one level the current one")
    a.add_argument("--to", type=int, required=True, metavar="VERSION")
    a.add_argument("--if-version", type=int, metavar="N", help="refuse unless the level is at version N")

    p = command("cmd", "remote commands: send, status, list")
    actions = p.add_subparsers(dest="action", required=True)

    def cmd_action(name: str, help: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help, description=help)
        a.add_argument("--nats", default=argparse.SUPPRESS, metavar="URL", help="NATS server URL")
        a.add_argument("--context", default=argparse.SUPPRESS, metavar="NAME|PATH", help="use this context")
        a.add_argument("--json", action="store_true", help="print JSON")
        a.set_defaults(func=cmd_cmd)
        return a

    a = cmd_action("send", "send a command to one device, a group or the fleet (one command id per device)")
    a.add_argument("target", nargs="+", metavar="[DEVICE] NAME [ARGS-JSON]")
    a.add_argument("--group", help="every device in this group")
    a.add_argument("--all", action="store_true", help="every known device")
    a.add_argument("--ttl", metavar="DURATION", help="not run after this long (30s, 5m, 2h, 1d)")
    a.add_argument("--wait", action="store_true", help="wait for the results; exit 1 unless all succeeded")
    a.add_argument("--timeout", type=float, default=30.0, help="how long --wait waits (default: %(default)s s)")
    a.add_argument("--force", action="store_true", help="queue it even for a device that has never connected")
    a = cmd_action("status", "one command's state and history")
    a.add_argument("id")
    a = cmd_action("list", "the commands sent to one device")
    a.add_argument("device")

    p = command("display", "show text on a board's display (TEXT - reads standard input)")
    p.add_argument("device", nargs="?", help="device id (or use --all)")
    p.add_argument("text", help="the text, or - for standard input")
    p.add_argument("--all", action="store_true", help="every connected board")
    p.set_defaults(func=cmd_display)

    p = command("nickname", "the load-balanced nickname service: ask it, serve it, or push a name to a board")
    p.add_argument("device", nargs="?", help="print this board's name (the same one every time it asks)")
    p.add_argument("--push", metavar="DEVICE", help="ask for DEVICE's name and show it on its display")
    p.add_argument("--serve", action="store_true", help="run one instance of the service")
    p.add_argument("--instance", help="this instance's name (default: nickname-PID)")
    p.set_defaults(func=cmd_nickname)

    p = command("query", "ask the connected boards; matching ones answer")
    p.add_argument("--where", metavar="EXPR", help='filter, e.g. "board == pico_w and temp > 40" (default: every board)')
    p.add_argument("--fields", metavar="F1,F2", help="fields to return (default: all)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for answers (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="one JSON object per matching board")
    p.set_defaults(func=cmd_query)

    p = command("sim", "run simulated boards (the real firmware in the MicroPython unix port)")
    p.add_argument("--devices", type=int, default=3, help="how many boards (default: %(default)s)")
    p.add_argument("--mqtt", metavar="HOST:PORT", help="use this broker; start nothing else")
    p.add_argument("--data-dir", default="sim-data", help="flash folders and logs (default: %(default)s)")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between readings (default: %(default)s)")
    p.add_argument("--nicknames", type=int, default=0, metavar="N", help="also run N nickname service instances")
    p.add_argument("--port", type=int, default=-1, help="NATS client port (default: a free one)")
    p.add_argument("--mqtt-port", type=int, default=-1, help="MQTT port (default: a free one)")
    p.add_argument("--context-name", default="sim", metavar="NAME", help="save where it listens as this context (default: %(default)s)")
    p.set_defaults(func=cmd_sim)

    p = command("context", "where the fleet's server is: list, show, use, add, rm (fleet server and fleet sim save one)")
    p.add_argument("action", nargs="?", default="list", choices=("list", "show", "use", "add", "rm"))
    p.add_argument("name", nargs="?", help="the context's name")
    p.add_argument("--mqtt", metavar="HOST:PORT", help="add: the MQTT listener")
    p.set_defaults(func=cmd_context)

    from fleet.cli.flash import add_commands as add_flash_commands

    add_flash_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from fleet.broker.context import apply_context, describe_source

        args.nats_given = getattr(args, "nats", None)
        apply_context(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as error:
        reported = _one_sentence(error)
        if reported is None:
            raise
        where = describe_source(args) if isinstance(reported, NatsUnavailable) else ""
        print(f"fleet {args.command}: {str(reported) or type(reported).__name__}{where}", file=sys.stderr)
        return reported.exit_code


if __name__ == "__main__":
    sys.exit(main())
