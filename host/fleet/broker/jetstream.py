"""JetStream helpers every part of the host shares: the fleet's streams
built one way, get-or-create a KV bucket (safe when several instances race),
listing a bucket's keys reliably, and acks that must not abort the rest of a
batch."""
from __future__ import annotations

import logging
from collections.abc import Awaitable

from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from fleet.protocol import nats_subject

log = logging.getLogger(__name__)


def device_stream(
    name: str,
    description: str,
    topic: str,
    *,
    max_age: float | None = None,
    max_bytes: int | None = None,
    max_msgs_per_subject: int | None = None,
    duplicate_window: float | None = None,
) -> api.StreamConfig:
    """The stream of one device topic from every board (fleet.*.<topic>): on
    file, kept by limits, the oldest dropped first when a limit is reached."""
    config = api.StreamConfig(
        name=name,
        description=description,
        subjects=[nats_subject("*", topic)],
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_age=max_age,
        max_bytes=max_bytes,
    )
    # Left as nats-py leaves them unless given (the server's defaults).
    if max_msgs_per_subject is not None:
        config.max_msgs_per_subject = max_msgs_per_subject
    if duplicate_window is not None:
        config.duplicate_window = duplicate_window
    return config


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


async def bucket_keys(kv: KeyValue) -> list[str]:
    """Every key in a KV bucket (deleted ones too: their get() raises
    KeyNotFoundError), sorted.

    Read from the bucket's stream subjects in one request, not with
    KeyValue.keys(): its watcher can signal the end of the initial replay
    before the replay has arrived (nats.py issue #842), and a listing then
    comes back empty although the keys exist. The stream's name and
    subject prefix are the bucket's own (nats-py keeps them on the KeyValue,
    pinned in pyproject.toml)."""
    prefix: str = kv._pre
    try:
        info = await kv._js.stream_info(kv._stream, subjects_filter=prefix + ">")
    except NotFoundError:
        return []
    return sorted(subject[len(prefix):] for subject in (info.state.subjects or {}))


async def key_history(kv: KeyValue, key: str) -> list[api.RawStreamMsg]:
    """Every stored revision of one key, oldest first, read message by
    message from the bucket's stream (see bucket_keys for why not
    KeyValue.history()). A deleted or purged revision carries the header
    KV-Operation."""
    subject = kv._pre + key
    found: list[api.RawStreamMsg] = []
    seq = 1
    while True:
        try:
            message = await kv._js.get_msg(kv._stream, seq, subject=subject, next=True)
        except NotFoundError:
            return found
        found.append(message)
        seq = (message.seq or seq) + 1


async def quietly(ack: Awaitable[None]) -> None:
    """Send an ack, nak or term; one that cannot be sent (connection lost)
    means redelivery later, which every consumer here tolerates, and must
    not abort the rest of the batch."""
    try:
        await ack
    except Exception as error:
        log.debug("ack not sent: %s", error)


__all__ = ["bucket_keys", "device_stream", "ensure_bucket", "key_history", "quietly"]
