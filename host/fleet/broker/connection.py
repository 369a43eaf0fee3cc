"""Connecting to NATS the same way everywhere: bounded, quiet, one clear error.

nats-py retries a failed first connect forever unless told otherwise and
reports every attempt through an error callback that prints tracebacks; the
CLI wants one line saying the server cannot be reached, and the gateway wants
a bounded first attempt and unbounded reconnects afterwards.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
from nats.aio.client import Client

from fleet.errors import Unavailable
from fleet.redact import redact_url

log = logging.getLogger(__name__)


class NatsUnavailable(Unavailable):
    """The NATS server cannot be reached (not running, wrong URL, refused)."""


async def connect(
    url: str,
    *,
    name: str,
    timeout: float = 5.0,
    reconnect_forever: bool = False,
    on_error: Callable[[Exception], Awaitable[None]] | None = None,
    creds: str | Path | None = None,
) -> Client:
    """Connect within `timeout` seconds or raise NatsUnavailable.

    `creds`: a .creds file (user JWT and seed) for a server in operator mode.

    With reconnect_forever the connection, once made, survives server
    restarts (the gateway); without it a lost connection is retried once
    (short-lived CLI tools).
    """
    last_error: list[Exception] = []
    connected = False
    # While reconnecting, nats-py reports every failed attempt (two a second):
    # the caller hears the first one after each loss, then the recovery.
    reported_since_up = False
    made: list[Client] = []

    async def remember_error(error: Exception) -> None:
        nonlocal reported_since_up
        last_error[:] = [error]
        # Failed first attempts end in the one NatsUnavailable below; only
        # trouble after that is the caller's to hear about.
        if connected and on_error is not None and not reported_since_up:
            reported_since_up = True
            await on_error(error)

    async def disconnected() -> None:
        closing = bool(made) and made[0].is_closed  # our own close() also calls this
        if connected and on_error is not None and reconnect_forever and not closing:
            log.warning("NATS connection to %s lost; reconnecting", redact_url(url))

    async def reconnected() -> None:
        nonlocal reported_since_up
        reported_since_up = False
        if on_error is not None:
            log.info("NATS connection to %s is back", redact_url(url))

    try:
        client = await asyncio.wait_for(
            nats.connect(
                url,
                name=name,
                connect_timeout=max(1, int(timeout)),
                # 1: nats-py treats 0 as "no limit" and would retry the first connect forever.
                max_reconnect_attempts=-1 if reconnect_forever else 1,
                reconnect_time_wait=0.5,
                allow_reconnect=True,
                error_cb=remember_error,
                disconnected_cb=disconnected,
                reconnected_cb=reconnected,
                user_credentials=None if creds is None else str(creds),
            ),
            timeout,
        )
    except (OSError, asyncio.TimeoutError, nats.errors.Error) as error:
        cause = last_error[0] if last_error else error
        detail = str(cause) or type(cause).__name__
        raise NatsUnavailable(f"cannot reach the NATS server at {redact_url(url)}: {detail}") from error
    connected = True
    made.append(client)
    return client


__all__ = ["NatsUnavailable", "connect"]
