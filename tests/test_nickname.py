"""The nickname service: instances in one queue group share the requests;
--push shows the name on a board."""
from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from support import GatewayThread, wait_for

from fleet.cli import main
from fleet.nickname import NICKNAMES, NicknameService, ask
from fleet.server import NatsServer
from fleet.simulator import Simulator


def test_requests_are_shared_between_instances(server: NatsServer) -> None:
    async def scenario() -> tuple[set[str], list[int], list[dict[str, str]]]:
        nc = await nats.connect(server.url)
        instances = [NicknameService(nc, f"instance-{i}") for i in range(2)]
        try:
            for instance in instances:
                await instance.start()
            answers = [await ask(nc) for _ in range(40)]
            return {a["instance"] for a in answers}, [i.served for i in instances], answers
        finally:
            for instance in instances:
                await instance.stop()
            await nc.close()

    instances, served, answers = asyncio.run(scenario())
    assert instances == {"instance-0", "instance-1"} and sum(served) == 40 and min(served) > 0
    assert all(a["nickname"] in NICKNAMES for a in answers)


def test_push_shows_the_nickname_on_the_board(
    tmp_path: Path, server: NatsServer, gateway: GatewayThread, capsys: pytest.CaptureFixture[str]
) -> None:
    sim = Simulator(tmp_path / "sim", server.host, server.mqtt_port)
    try:
        sim.start(sim.add("sim-001").device_id)
        sim.wait_for_log("sim-001", "link: up")

        async def serve_and_push() -> int:
            nc = await nats.connect(server.url)
            service = NicknameService(nc, "only")
            await service.start()
            try:
                return await asyncio.to_thread(main, ["nickname", "--push", "sim-001", "--nats", server.url])
            finally:
                await service.stop()
                await nc.close()

        capsys.readouterr()
        assert asyncio.run(serve_and_push()) == 0
        out = capsys.readouterr().out
        name = out.split(": ", 1)[1].split(" (from")[0]
        assert name in NICKNAMES and "(from only)" in out
        wait_for(lambda: f"display: {name}" in sim.devices["sim-001"].log_text(), "the nickname shown", 10)
    finally:
        sim.stop_all()


def test_no_instance_is_a_clear_error(server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nickname", "--nats", server.url]) == 1
    assert "no nickname instance answered" in capsys.readouterr().err
