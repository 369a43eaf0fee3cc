"""The nickname service: instances in one queue group share the requests;
--push shows the name on a board."""
from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from support import GatewayThread, wait_for, wait_registered

from fleet.cli.main import main
from fleet.state.nickname import NICKNAMES, NicknameService, NoNicknameLeft, ask
from fleet.broker.server import NatsServer
from fleet.sim.simulator import Simulator


def test_requests_are_shared_between_instances(server: NatsServer) -> None:
    async def scenario() -> tuple[set[str], list[int], list[dict[str, str]]]:
        nc = await nats.connect(server.url)
        instances = [NicknameService(nc, f"instance-{i}") for i in range(2)]
        try:
            for instance in instances:
                await instance.start()
            answers = [await ask(nc, f"dev-{i % 8}") for i in range(40)]
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
        wait_registered(server.url, "sim-001")

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


def test_names_are_unique_across_instances_and_a_board_keeps_its_own(server: NatsServer) -> None:
    async def scenario() -> tuple[list[dict[str, str]], list[dict[str, str]], str]:
        nc = await nats.connect(server.url)
        instances = [NicknameService(nc, f"instance-{i}") for i in range(2)]
        try:
            for instance in instances:
                await instance.start()
            devices = [f"dev-{i}" for i in range(len(NICKNAMES))]
            # All at once, load-balanced over both instances: every claim races.
            first = await asyncio.gather(*(ask(nc, device) for device in devices))
            again = await asyncio.gather(*(ask(nc, device) for device in devices))
            try:
                await ask(nc, "one-too-many")
                left = "answered"
            except NoNicknameLeft as error:
                left = str(error)
            return list(first), list(again), left
        finally:
            for instance in instances:
                await instance.stop()
            await nc.close()

    first, again, left = asyncio.run(scenario())
    names = [a["nickname"] for a in first]
    assert sorted(names) == sorted(NICKNAMES)  # every name once: none given to two boards
    assert {a["instance"] for a in first} == {"instance-0", "instance-1"}
    assert [a["nickname"] for a in again] == names
    assert "no nickname left for one-too-many" in left


def test_push_to_an_unknown_device_is_refused(server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nickname", "--push", "sim-999", "--nats", server.url]) == 1
    assert "unknown device sim-999" in capsys.readouterr().err


def test_no_instance_is_a_clear_error(server: NatsServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nickname", "sim-001", "--nats", server.url]) == 1
    assert "no nickname instance answered" in capsys.readouterr().err
