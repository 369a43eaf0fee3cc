"""Secrets never printed: URLs lose their password before they reach a log or an error."""
from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """nats://user:secret@host:4222 -> nats://user:***@host:4222; other URLs unchanged.

    Also handles a comma-separated server list, as nats-py accepts one.
    """
    if "," in url:
        return ",".join(redact_url(part) for part in url.split(","))
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None and not (parts.username and "@" in parts.netloc and ":" not in parts.netloc.split("@")[0]):
        return url
    user = parts.username or ""
    # A bare token (nats://TOKEN@host) is a secret too.
    shown_user = f"{user}:***" if parts.password is not None else "***"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{shown_user}@{host}", parts.path, parts.query, parts.fragment))


__all__ = ["redact_url"]
