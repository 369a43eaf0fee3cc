"""A gateway serving from its own thread, for synchronous callers (the
benchmark, tests): the real Gateway on a private event loop."""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

from fleet.gateway.forwarding import SplitterConfig
from fleet.gateway.service import Gateway, GatewayConfig
from fleet.wire import ForwardingState

T = TypeVar("T")


class BackgroundGateway:
    def __init__(self, nats_url: str, fetch_wait: float = 0.25, mqtt: tuple[str, int] | None = None,
                 creds: str | None = None, mqtt_password: str | None = None) -> None:
        """`creds`, `mqtt_password`: the gateway's identity on a server in
        operator mode (its .creds file; a bearer JWT for its MQTT link)."""
        self.nats_url = nats_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fleet-gateway", daemon=True)
        self.gateway = Gateway(
            GatewayConfig(
                nats_url=nats_url,
                nats_creds=creds,
                mqtt_username="fleet-gateway" if mqtt_password else None,
                mqtt_password=mqtt_password,
                fetch_wait=fetch_wait,
                splitter=SplitterConfig(fetch_wait=fetch_wait, lease_ttl=3.0),
                mqtt_host=mqtt[0] if mqtt else None,
                mqtt_port=mqtt[1] if mqtt else None,
            )
        )

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the gateway's loop and wait for its result."""
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def __enter__(self) -> BackgroundGateway:
        self.thread.start()
        self.call(self.gateway.start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.gateway.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def forwarding(self, device_id: str) -> ForwardingState | None:
        assert self.gateway.splitter is not None
        return self.call(self.gateway.splitter.state(device_id))


__all__ = ["BackgroundGateway"]
