"""Helpers for end-to-end tests: a gateway on its own thread, and bounded
polling of what JetStream holds."""
from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from fleet.forwarding import SplitterConfig
from fleet.gateway import Gateway, GatewayConfig
from fleet.tail import Reading, stored
from fleet.wire import ForwardingState

T = TypeVar("T")


class GatewayThread:
    """A real Gateway serving from a background event loop, for sync tests."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway", daemon=True)
        self.gateway = Gateway(
            GatewayConfig(nats_url=nats_url, fetch_wait=0.25, splitter=SplitterConfig(fetch_wait=0.25, lease_ttl=3.0))
        )

    def call(self, coroutine: Any, timeout: float = 30.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def __enter__(self) -> GatewayThread:
        self.thread.start()
        self.call(self.gateway.start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.gateway.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def forwarding(self, device_id: str) -> ForwardingState | None:
        assert self.gateway.splitter is not None
        return self.call(self.gateway.splitter.state(device_id))


def stored_readings(nats_url: str, device_id: str) -> list[Reading]:
    return asyncio.run(stored(nats_url, device_id))


def wait_for(check: Callable[[], T | None], what: str, timeout: float, every: float = 0.2) -> T:
    """Poll `check` until it returns something truthy; fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        time.sleep(every)
