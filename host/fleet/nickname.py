"""The nickname service: a NATS micro service any number of instances serve
in one queue group (nats.micro's default), so each request is answered by
one of them, load-balanced by the server. Each instance names itself in
its answers. `fleet nickname --push DEVICE` asks it and shows the name on
the board's display.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

from . import __version__
from .protocol import api_subject, nats_subject

NICKNAMES = (
    "Jeremy", "Ada", "Grace", "Linus", "Margaret", "Dennis", "Barbara", "Ken",
    "Radia", "Guido", "Frances", "Niklaus", "Hedy", "Alan", "Katherine", "Edsger",
)


@dataclass
class NicknameService:
    nc: Client
    instance: str
    names: tuple[str, ...] = NICKNAMES
    served: int = 0
    _service: Service | None = field(default=None, repr=False)

    async def start(self) -> None:
        self._service = await add_service(
            self.nc, name="nickname", version=__version__, description="a nickname for a board, from any instance",
            metadata={"instance": self.instance},
        )
        await self._service.add_endpoint(name="nickname", subject=api_subject("nickname"), handler=self._handle)

    async def stop(self) -> None:
        if self._service is not None:
            await self._service.stop()

    async def _handle(self, request: Request) -> None:
        self.served += 1
        name = random.choice(self.names)
        await request.respond(json.dumps({"nickname": name, "instance": self.instance}).encode())


async def ask(nc: Client, timeout: float = 2.0) -> dict[str, str]:
    reply = await nc.request(api_subject("nickname"), b"", timeout=timeout)
    answer = json.loads(reply.data)
    return {"nickname": str(answer["nickname"]), "instance": str(answer["instance"])}


async def push(nc: Client, device: str, timeout: float = 2.0) -> dict[str, str]:
    """Ask the service for a name and show it on the device's display."""
    answer = await ask(nc, timeout)
    await nc.publish(nats_subject(device, "display"), answer["nickname"].encode())
    await nc.flush()
    return answer


__all__ = ["NICKNAMES", "NicknameService", "ask", "push"]
