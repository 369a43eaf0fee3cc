"""Helpers for end-to-end tests: a gateway on its own thread, and bounded
polling of what JetStream holds."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bench.background import BackgroundGateway
from fleet.sim.simulator import Simulator
from fleet.client.tail import Reading, stored

T = TypeVar("T")


GatewayThread = BackgroundGateway


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


def registered(nats_url: str, device_id: str, creds: str | None = None) -> bool:
    """Whether the gateway's registry has a record of the device (commands naming it are accepted)."""
    import nats

    from fleet.state.inventory import UnknownDevice, known_device

    async def check() -> bool:
        nc = await (nats.connect(nats_url, user_credentials=creds) if creds else nats.connect(nats_url))
        try:
            await known_device(nc.jetstream(), device_id)
            return True
        except UnknownDevice:
            return False
        finally:
            await nc.close()

    return asyncio.run(check())


def wait_registered(nats_url: str, device_id: str, timeout: float = 10) -> None:
    wait_for(lambda: registered(nats_url, device_id), f"the registry to know {device_id}", timeout)


def cut_link(sim: Simulator, device: str) -> None:
    """Drop the board's link and wait until it has seen the cut and a refused retry."""
    downs = sim.devices[device].log_text().count("link: down")
    sim.set_link(device, "drop")
    sim.wait_for_log(device, "link: down", count=downs + 2, timeout=10)
