"""Connecting to NATS: a lost server is reported once per loss, not once per
reconnect attempt, and the password in a URL never reaches the log."""
from __future__ import annotations

import asyncio
import logging

import pytest

from fleet.broker.connection import connect
from fleet.broker.server import NatsServer


def test_a_server_down_is_reported_once_then_its_return(
    server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    errors: list[Exception] = []

    async def on_error(error: Exception) -> None:
        errors.append(error)

    async def scenario() -> None:
        url = server.url.replace("nats://", "nats://fleetuser:s3cret@")
        nc = await connect(url, name="test", reconnect_forever=True, on_error=on_error)
        try:
            server.stop()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            # Several failed attempts (nats-py retries every 0.5 s) before the server is back.
            while nc._server_pool[0].reconnects < 4:  # noqa: SLF001 - the attempts are only counted there
                assert loop.time() < deadline, "nats-py never retried"
                await asyncio.sleep(0.05)
            server.start()
            while not nc.is_connected:
                assert loop.time() < deadline, "never reconnected"
                await asyncio.sleep(0.05)
        finally:
            await nc.close()

    with caplog.at_level(logging.INFO, logger="fleet.broker.connection"):
        asyncio.run(scenario())
    assert len(errors) == 1
    messages = [record.getMessage() for record in caplog.records if record.name == "fleet.broker.connection"]
    assert sum("lost" in m for m in messages) == 1 and sum("is back" in m for m in messages) == 1, messages
    assert "s3cret" not in caplog.text and "fleetuser:***@" in caplog.text
