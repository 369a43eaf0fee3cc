"""The nickname service: a NATS micro service any number of instances serve
in one queue group (nats.micro's default), so each request is answered by
one of them, load-balanced by the server. Each instance names itself in
its answers. `fleet nickname --push DEVICE` asks it and shows the name on
the board's display.

A request is a device id. Names are claimed in the KV bucket
`fleet_nicknames`, shared by every instance: `name.<N>` holds the device
that owns name N, written with kv.create (which fails when the key exists)
so no two boards ever get one name, whichever instances they ask;
`device.<id>` holds the board's name, so asking again gives it back.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from nats.micro import add_service
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER, Request, ServiceError
from nats.micro.service import Service

from fleet import __version__
from fleet.errors import Refused, UsageError
from fleet.broker.jetstream import ensure_bucket
from fleet.protocol import api_subject, nats_subject
from fleet.schema import id_problem

NICKNAMES = (
    "Jeremy", "Ada", "Grace", "Linus", "Margaret", "Dennis", "Barbara", "Ken",
    "Radia", "Guido", "Frances", "Niklaus", "Hedy", "Alan", "Katherine", "Edsger",
)
NICKNAMES_BUCKET = "fleet_nicknames"


class NoNicknameLeft(Refused):
    """Every name is held by another board."""


@dataclass(frozen=True)
class NicknameClaims:
    """The names held in the bucket, and the claims that take them."""

    kv: KeyValue
    names: tuple[str, ...] = NICKNAMES

    async def claim(self, device: str) -> str:
        """The device's name: the one it holds, else a free one taken now."""
        held = await self._value(f"device.{device}")
        if held is not None:
            return held
        # A random order keeps instances from all trying the same free name first.
        for name in random.sample(self.names, len(self.names)):
            try:
                revision = await self.kv.create(f"name.{name}", device.encode())
            except KeyWrongLastSequenceError:
                if await self._value(f"name.{name}") == device:
                    # Ours from an earlier claim that stopped before it was bound.
                    return await self._bind(device, name, None)
                continue
            return await self._bind(device, name, revision)
        raise NoNicknameLeft(f"no nickname left for {device}: all {len(self.names)} are taken by other boards")

    async def _bind(self, device: str, name: str, revision: int | None) -> str:
        try:
            await self.kv.create(f"device.{device}", name.encode())
            return name
        except KeyWrongLastSequenceError:
            pass
        # The same board asked another instance at the same moment and was
        # bound first: both answer its name, and the one taken here is freed.
        winner = await self._value(f"device.{device}")
        if winner is None:  # bound and then removed meanwhile: keep trying with ours
            return await self._bind(device, name, revision)
        if winner != name and revision is not None:
            try:
                await self.kv.delete(f"name.{name}", last=revision)
            except KeyWrongLastSequenceError:
                pass  # no longer the claim made here: not ours to free
        return winner

    async def _value(self, key: str) -> str | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        return (entry.value or b"").decode() or None


@dataclass
class NicknameService:
    nc: Client
    instance: str
    names: tuple[str, ...] = NICKNAMES
    served: int = 0
    _claims: NicknameClaims | None = field(default=None, repr=False)
    _service: Service | None = field(default=None, repr=False)

    async def start(self) -> None:
        kv = await ensure_bucket(
            self.nc.jetstream(), NICKNAMES_BUCKET, "nicknames: name.<N> -> device id, device.<id> -> N"
        )
        self._claims = NicknameClaims(kv, self.names)
        self._service = await add_service(
            self.nc, name="nickname", version=__version__, description="a nickname for a board, from any instance",
            metadata={"instance": self.instance},
        )
        await self._service.add_endpoint(name="nickname", subject=api_subject("nickname"), handler=self._handle)

    async def stop(self) -> None:
        if self._service is not None:
            await self._service.stop()

    async def _handle(self, request: Request) -> None:
        assert self._claims is not None
        self.served += 1
        device = request.data.decode("utf-8", errors="replace").strip()
        if problem := id_problem(device):
            raise ServiceError("400", problem)
        try:
            name = await self._claims.claim(device)
        except NoNicknameLeft as error:
            raise ServiceError("503", str(error)) from None
        await request.respond(json.dumps({"nickname": name, "instance": self.instance}).encode())


async def ask(nc: Client, device: str, timeout: float = 2.0) -> dict[str, str]:
    """The device's nickname from any instance; UsageError (400) or Refused (503: none left)."""
    reply = await nc.request(api_subject("nickname"), device.encode(), timeout=timeout)
    headers = reply.headers or {}
    if ERROR_CODE_HEADER in headers:
        description = headers.get(ERROR_HEADER, "nickname service error")
        code = headers[ERROR_CODE_HEADER]
        if code == "400":
            raise UsageError(description)
        if code == "503":
            raise NoNicknameLeft(description)
        raise Refused(f"{description} ({code})")
    answer = json.loads(reply.data)
    return {"nickname": str(answer["nickname"]), "instance": str(answer["instance"])}


async def push(nc: Client, device: str, timeout: float = 2.0) -> dict[str, str]:
    """Ask the service for the device's name and show it on the device's display."""
    answer = await ask(nc, device, timeout)
    await nc.publish(nats_subject(device, "display"), answer["nickname"].encode())
    await nc.flush()
    return answer


__all__ = ["NICKNAMES", "NICKNAMES_BUCKET", "NicknameClaims", "NicknameService", "NoNicknameLeft", "ask", "push"]
