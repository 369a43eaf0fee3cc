"""`fleet`: operate the fleet. Thin: parse, call the library, print.

Every command takes --nats URL (default: $FLEET_NATS_URL, else
nats://127.0.0.1:4222); listing commands take --json for programs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def default_nats_url() -> str:
    return os.environ.get("FLEET_NATS_URL", DEFAULT_NATS_URL)


def cmd_server(args: argparse.Namespace) -> int:
    from .server import NatsServer, wait_for_signal

    server = NatsServer(Path(args.data_dir), host=args.host, port=args.port, mqtt_port=args.mqtt_port)
    server.start()
    print(f"nats-server ready: NATS {server.url}  MQTT mqtt://{server.host}:{server.mqtt_port}")
    print(f"data and config in {server.data_dir} (log: {server.log_path}); Ctrl-C stops it")
    sys.stdout.flush()
    try:
        wait_for_signal()
    finally:
        server.stop()
        print("nats-server stopped")
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    raise NotImplementedError


def cmd_devices(args: argparse.Namespace) -> int:
    raise NotImplementedError


def cmd_tail(args: argparse.Namespace) -> int:
    raise NotImplementedError


def cmd_sim(args: argparse.Namespace) -> int:
    import asyncio

    from .simsession import SimOptions, run_simulation

    options = SimOptions(devices=args.devices, data_dir=Path(args.data_dir), mqtt=args.mqtt, duration=args.duration)
    return asyncio.run(run_simulation(options))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleet", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--nats", default=default_nats_url(), metavar="URL",
                       help="NATS server URL (default: $FLEET_NATS_URL or %(default)s)")
        return p

    p = command("server", "run nats-server with JetStream and the MQTT listener")
    p.add_argument("--data-dir", default="fleet-data", help="config, JetStream store and log (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback)")
    p.add_argument("--port", type=int, default=4222, help="NATS client port (-1: any free port)")
    p.add_argument("--mqtt-port", type=int, default=1883, help="MQTT port (-1: any free port)")
    p.set_defaults(func=cmd_server)

    p = command("gateway", "bridge the boards' MQTT topics to JetStream and serve the fleet API")
    p.set_defaults(func=cmd_gateway)

    p = command("devices", "list the devices with presence and last-seen time")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_devices)

    p = command("tail", "print telemetry as it arrives (from the JetStream stream)")
    p.add_argument("device", nargs="?", help="only this device")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_tail)

    p = command("sim", "run simulated boards (the real firmware in the MicroPython unix port)")
    p.add_argument("--devices", type=int, default=3, help="how many boards (default: %(default)s)")
    p.add_argument("--mqtt", metavar="HOST:PORT", help="use this broker; start nothing else")
    p.add_argument("--data-dir", default="sim-data", help="flash folders and logs (default: %(default)s)")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.set_defaults(func=cmd_sim)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
