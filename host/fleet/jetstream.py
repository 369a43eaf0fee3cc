"""JetStream helpers every part of the host shares: get-or-create a KV
bucket (safe when several instances race), and acks that must not abort
the rest of a batch."""
from __future__ import annotations

import logging
from collections.abc import Awaitable

from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BucketNotFoundError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)


async def ensure_bucket(
    js: JetStreamContext, name: str, description: str, history: int = 1, ttl: float | None = None
) -> KeyValue:
    """The KV bucket `name`, created with these settings if it does not exist."""
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(
            bucket=name, description=description, history=history, ttl=ttl, storage=api.StorageType.FILE
        )
    except APIError:
        # Another instance created it between our two calls.
        return await js.key_value(name)


async def quietly(ack: Awaitable[None]) -> None:
    """Send an ack, nak or term; one that cannot be sent (connection lost)
    means redelivery later, which every consumer here tolerates, and must
    not abort the rest of the batch."""
    try:
        await ack
    except Exception as error:
        log.debug("ack not sent: %s", error)


__all__ = ["ensure_bucket", "quietly"]
