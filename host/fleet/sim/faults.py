"""Network faults between a simulated board and the broker.

A `LinkProxy` is a TCP proxy on loopback that the simulator puts between
each device and the broker's MQTT port. It can pass traffic, drop every
connection (the device sees a reset), black-hole it (connections stay open
but nothing moves either way, and no RST: the device must notice by
itself), or add delay. All proxies of a simulator share one event loop in a
background thread.
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Coroutine


class LinkMode(str, Enum):
    PASS = "pass"
    DROP = "drop"  # close every connection, refuse new ones
    BLACKHOLE = "blackhole"  # accept, then forward nothing


class ProxyLoop:
    """One asyncio loop in a daemon thread, serving every proxy."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fleet-link-proxies", daemon=True)
        self.thread.start()

    def call(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.call(self._cancel_tasks())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    @staticmethod
    async def _cancel_tasks() -> None:
        # Connections still being piped end here, so no task outlives its loop.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class LinkProxy:
    upstream_host: str
    upstream_port: int
    mode: LinkMode = LinkMode.PASS
    delay: float = 0.0  # seconds added to every chunk, each direction
    port: int = 0
    connections: int = 0
    _server: asyncio.base_events.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server:
            self._server.close()
        self._close_all()

    async def set_mode(self, mode: LinkMode, delay: float | None = None) -> None:
        self.mode = mode
        if delay is not None:
            self.delay = delay
        if mode is LinkMode.DROP:
            self._close_all()

    def _close_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()  # RST, like a link that went away
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode is LinkMode.DROP:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if self.delay:
                await asyncio.sleep(self.delay)
            while self.mode is LinkMode.BLACKHOLE:
                await asyncio.sleep(0.05)  # held, never delivered while the hole lasts
                data = b""  # what was in flight during the outage is lost, as on a dead link
            if self.mode is LinkMode.DROP:
                break
            if data:
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
