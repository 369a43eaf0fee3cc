"""End to end: the real firmware in the real MicroPython VM against a real
nats-server's MQTT listener."""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator

import pytest

from fleet.client.commands import send, status
from fleet.sim.observe import FleetObserver
from fleet.broker.server import NatsServer
from fleet.sim.simulator import Simulator
from support import GatewayThread, stored_readings, wait_for

KEEPALIVE_S = 2
FAST = {
    "telemetry_interval_ms": 200,
    "keepalive_s": KEEPALIVE_S,
    "reconnect_min_ms": 100,
    "reconnect_max_ms": 1000,
    "socket_timeout_ms": 2000,
}


@pytest.fixture
def sim(simulators: Callable[..., Simulator], gateway: GatewayThread) -> Simulator:
    return simulators(settings_defaults=FAST)


@pytest.fixture
def observer(server: NatsServer) -> Iterator[FleetObserver]:
    with FleetObserver(server.host, server.mqtt_port) as obs:
        yield obs


def test_three_devices_come_online_and_publish_increasing_sequences(sim: Simulator, observer: FleetObserver) -> None:
    devices = sim.start_fleet(3)
    ids = [d.device_id for d in devices]
    observer.wait_until(lambda: all(observer.devices.get(i) and observer.devices[i].online for i in ids), 10, "3 online")
    observer.wait_until(lambda: all(len(observer.devices[i].seqs) >= 5 for i in ids), 10, "5 readings each")
    for device_id in ids:
        view = observer.device(device_id)
        assert view.status["board"] == "sim" and view.status["id"] == device_id
        seqs = view.seqs
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        reading = view.last_reading
        assert reading is not None
        for key in ("temp_c", "uptime_s", "heap_free", "rssi", "ts", "boot"):
            assert key in reading


def test_killed_device_goes_offline_within_keepalive_bound(sim: Simulator, observer: FleetObserver) -> None:
    sim.start_fleet(1)
    view = observer.device("sim-001")
    observer.wait_until(lambda: view.online is True, 10, "online")
    sim.kill("sim-001")
    killed = time.monotonic()
    observer.wait_until(lambda: view.online is False, 1.5 * KEEPALIVE_S + 2, "offline after SIGKILL")
    assert time.monotonic() - killed < 1.5 * KEEPALIVE_S + 2


def test_hung_device_is_declared_offline_by_keepalive_and_recovers(sim: Simulator, observer: FleetObserver) -> None:
    # SIGSTOP keeps the socket open but silent: only the keepalive can tell.
    sim.start_fleet(1)
    view = observer.device("sim-001")
    observer.wait_until(lambda: view.online is True, 10, "online")
    sim.freeze("sim-001")
    frozen = time.monotonic()
    observer.wait_until(lambda: view.online is False, 1.5 * KEEPALIVE_S + 3, "offline by keepalive")
    assert time.monotonic() - frozen >= KEEPALIVE_S  # not before the broker could know
    sim.thaw("sim-001")
    observer.wait_until(lambda: view.online is True, 10, "back online after thaw")


def test_devices_reconnect_and_resume_after_broker_restart(sim: Simulator, observer: FleetObserver, server: NatsServer) -> None:
    ids = [d.device_id for d in sim.start_fleet(3)]
    observer.wait_until(lambda: all(len(observer.device(i).seqs) >= 2 for i in ids), 10, "telemetry flowing")
    observer.stop()
    server.restart()
    restarted = time.monotonic()
    with FleetObserver(server.host, server.mqtt_port, client_id="observer-2") as after:
        after.wait_until(lambda: all(len(after.device(i).seqs) >= 3 for i in ids), 20, "telemetry resumed")
        assert time.monotonic() - restarted < 20
        for device_id in ids:
            assert after.device(device_id).online is True
            assert "link: up" in sim.wait_for_log(device_id, "link: up", count=2)


def test_invalid_settings_give_one_clear_line_and_the_device_keeps_retrying(sim: Simulator, observer: FleetObserver) -> None:
    sim.add("sim-001")
    sim.write_settings("sim-001", {**sim.read_settings("sim-001"), "mqtt_port": "not-a-port"})
    device = sim.start("sim-001")
    log = sim.wait_for_log("sim-001", "settings error:", count=2, timeout=15)
    assert "mqtt_port: must be an integer" in log
    assert "Traceback" not in log
    assert device.running
    # Fixing the file is enough: the next retry picks it up.
    sim.write_settings("sim-001", {**sim.read_settings("sim-001"), "mqtt_port": observer.port})
    observer.wait_until(lambda: observer.device("sim-001").online is True, 20, "online after fix")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "settings.json: not valid JSON"),
        ('{"device_id": "bad id!", "wifi_ssid": "x", "mqtt_host": "h"}', "device_id: must match"),
        ('{"wifi_ssid": "x"}', "mqtt_host: missing"),
        ('{"wifi_ssid": "x", "mqtt_host": "h", "color": 1}', "color: unknown setting"),
    ],
)
def test_each_settings_problem_names_the_field(sim: Simulator, content: str, message: str) -> None:
    sim.add("sim-001")
    sim.write_settings("sim-001", content)
    sim.start("sim-001")
    log = sim.wait_for_log("sim-001", "settings error:")
    assert message in log
    assert sim.devices["sim-001"].running


def test_restarted_device_keeps_its_id_and_continues_its_sequence(sim: Simulator, observer: FleetObserver) -> None:
    sim.start_fleet(1)
    view = observer.device("sim-001")
    observer.wait_until(lambda: len(view.seqs) >= 3, 10, "first readings")
    boots_before = view.status["boots"]
    sim.power_cycle("sim-001")
    last_before = view.seqs[-1]
    observer.wait_until(lambda: view.status.get("boots") == boots_before + 1 and view.online is True, 10, "rebooted")
    observer.wait_until(lambda: len(view.seqs) and view.seqs[-1] > last_before and view.readings[-1]["boot"] == boots_before + 1, 10, "new readings")
    after = [r["seq"] for r in view.readings if r["boot"] == boots_before + 1]
    assert min(after) > last_before
    assert view.status["id"] == "sim-001"


def test_device_answers_ping_on_its_pong_topic(sim: Simulator, observer: FleetObserver) -> None:
    sim.start_fleet(1)
    observer.wait_until(lambda: observer.device("sim-001").online is True, 10, "online")
    observer.ping("sim-001", b"are-you-there")
    observer.wait_until(
        lambda: any(t == "fleet/sim-001/pong" and p == b"are-you-there" for _, t, p in observer.messages), 5, "pong"
    )


def test_free_heap_does_not_drift_down_over_hundreds_of_readings(sim: Simulator, observer: FleetObserver) -> None:
    sim.start_fleet(1, telemetry_interval_ms=10)
    view = observer.device("sim-001")

    def idle_heap() -> list[int]:
        # Free heap of readings taken with nothing waiting in the backlog: a
        # batch in flight holds its payload until the gateway acks it, so
        # only these are comparable with each other.
        return [r["heap_free"] for r in view.readings[100:] if r["backlog"] == 0]

    observer.wait_until(lambda: len(view.readings) >= 600 and len(idle_heap()) >= 30, 60, "600 readings, 30 of them idle")
    heap = idle_heap()
    settled = heap[0]  # after the first connect and the first few allocations
    assert min(heap) >= settled - 256, (settled, sorted(set(heap)))
    assert 0 < settled < 128 * 1024


def test_simulated_telemetry_lands_in_jetstream_and_the_cli_shows_the_fleet(
    sim: Simulator, observer: FleetObserver, server: NatsServer, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    import json

    from fleet.cli.main import main as fleet
    from fleet.gateway.service import Gateway, GatewayConfig

    async def scenario() -> None:
        gateway = Gateway(GatewayConfig(nats_url=server.url))
        await gateway.start()
        try:
            ids = [d.device_id for d in sim.start_fleet(3)]
            observer.wait_until(lambda: all(len(observer.device(i).seqs) >= 5 for i in ids), 15, "readings")
            # The CLI runs its own event loop: run it in a thread, the gateway keeps serving here.
            code = await asyncio.to_thread(fleet, ["tail", "--nats", server.url, "--last", "15", "--count", "15", "--json"])
            lines = capsys.readouterr().out.splitlines()
            assert code == 0 and len(lines) == 15
            assert {json.loads(line)["device"] for line in lines} <= set(ids)
            deadline = time.monotonic() + 10
            while True:
                code = await asyncio.to_thread(fleet, ["devices", "--nats", server.url, "--json"])
                records = json.loads(capsys.readouterr().out)
                assert code == 0
                if sum(1 for r in records if r["online"]) == 3 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            assert sorted(r["id"] for r in records if r["online"]) == ids
            assert all(r["last_seq"] is not None and r["board"] == "sim" for r in records)
        finally:
            await gateway.stop()

    capsys.readouterr()
    asyncio.run(scenario())


def test_jetstream_holds_each_devices_readings_in_increasing_sequence(sim: Simulator, observer: FleetObserver, server: NatsServer) -> None:
    import asyncio

    from fleet.gateway.service import Gateway, GatewayConfig
    from fleet.client.tail import Reading, follow

    ids = ["sim-001", "sim-002", "sim-003"]

    async def scenario() -> list[Reading]:
        gateway = Gateway(GatewayConfig(nats_url=server.url))
        await gateway.start()  # creates the stream before the boards publish
        try:
            sim.start_fleet(3)
            got: list[Reading] = []
            await asyncio.wait_for(follow(server.url, None, limit=30, on_reading=got.append), 30)
            return got
        finally:
            await gateway.stop()

    readings = asyncio.run(scenario())
    by_device: dict[str, list[int]] = {}
    for reading in readings:
        assert not reading.malformed
        by_device.setdefault(reading.device, []).append(reading.payload["seq"])
    assert set(by_device) <= set(ids) and len(by_device) >= 2
    for seqs in by_device.values():
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


@pytest.fixture
def faulty_sim(simulators: Callable[..., Simulator], gateway: GatewayThread) -> Simulator:
    return simulators(settings_defaults=FAST, fault_injection=True)


def test_black_holed_link_is_noticed_by_the_device_itself_and_recovers(faulty_sim: Simulator, observer: FleetObserver) -> None:
    faulty_sim.start_fleet(1)
    view = observer.device("sim-001")
    observer.wait_until(lambda: view.online is True, 10, "online")
    faulty_sim.set_link("sim-001", "blackhole")
    # No RST arrives: only the device's own timers can tell (a missing
    # PINGRESP, or a PUBACK that does not come).
    log = faulty_sim.wait_for_log("sim-001", "link: down", timeout=KEEPALIVE_S * 2 + 3)
    assert "no answer to ping" in log or "no answer from the broker" in log, log
    observer.wait_until(lambda: view.online is False, 1.5 * KEEPALIVE_S + 3, "broker sent the last will")
    faulty_sim.set_link("sim-001", "pass")
    seen = len(view.seqs)
    observer.wait_until(lambda: view.online is True and len(view.seqs) > seen + 2, 15, "back online, telemetry again")


def test_dropped_link_reconnects_with_backoff_until_it_heals(faulty_sim: Simulator, observer: FleetObserver) -> None:
    faulty_sim.start_fleet(1)
    view = observer.device("sim-001")
    observer.wait_until(lambda: view.online is True, 10, "online")
    faulty_sim.set_link("sim-001", "drop")
    faulty_sim.wait_for_log("sim-001", "link: down", count=3, timeout=15)  # it keeps trying
    assert faulty_sim.devices["sim-001"].running
    faulty_sim.set_link("sim-001", "pass")
    observer.wait_until(lambda: view.online is True and view.status_changes[-1][1] is True, 15, "online again")
    # The board's own account ends with the link up (the cut may come
    # between its first birth message and its first "link: up" line).
    device = faulty_sim.devices["sim-001"]
    wait_for(lambda: (text := device.log_text()).rfind("link: up") > text.rfind("link: down"), "link: up last", 10)


def test_a_board_runs_from_the_compiled_mpy_files(
    simulators: Callable[..., Simulator], server: NatsServer, gateway: GatewayThread
) -> None:
    # The same bytecode `fleet flash` copies: no .py of the firmware on the path.
    simulator = simulators("mpy-sim", settings_defaults=FAST, compiled=True)
    simulator.start_fleet(1)
    log = simulator.wait_for_log("sim-001", "link: up")
    assert "sim firmware 0.1.0 from .mpy" in log
    compiled = sorted(p.name for p in (simulator.data_dir / "mpy").iterdir())
    assert "device.mpy" in compiled and "board.mpy" in compiled and "device.py" not in compiled
    wait_for(lambda: len(stored_readings(server.url, "sim-001")) >= 3, "readings from the .mpy board", 15)
    # Command code is imported from its .mpy file for each command and let
    # go of after it (coldcode.let_go): twice, to see it come back.
    for name, args, result in (("display", {"text": "from .mpy"}, {"shown": "from .mpy"}), ("ping", {}, "pong")):
        (sent,) = asyncio.run(send(server.url, name, args, device="sim-001"))
        done = wait_for(lambda: (r := asyncio.run(status(server.url, sent.id))).final and r, f"{name} to finish", 20)
        assert done.state == "succeeded" and done.result == result, done


def test_a_board_runs_in_place_from_a_rom_image(
    simulators: Callable[..., Simulator], server: NatsServer, gateway: GatewayThread
) -> None:
    # The compiled firmware packed by `mpremote romfs build`, mounted at /rom
    # from memory outside the VM's heap, as a board's ROM partition is.
    simulator = simulators("rom-sim", settings_defaults=FAST, romfs=True)
    (device,) = simulator.start_fleet(1)
    log = simulator.wait_for_log("sim-001", "link: up")
    assert "sim firmware 0.1.0 from ROM" in log
    assert not [p.name for p in device.flash_dir.iterdir() if p.suffix in (".py", ".mpy")]
    wait_for(lambda: len(stored_readings(server.url, "sim-001")) >= 3, "readings from the ROM board", 15)
    # Command code is imported from the image for each command and let go
    # of after it (coldcode.let_go): twice, to see it come back.
    for name, args, result in (("display", {"text": "from ROM"}, {"shown": "from ROM"}), ("ping", {}, "pong")):
        (sent,) = asyncio.run(send(server.url, name, args, device="sim-001"))
        done = wait_for(lambda: (r := asyncio.run(status(server.url, sent.id))).final and r, f"{name} to finish", 20)
        assert done.state == "succeeded" and done.result == result, done


def test_a_safe_file_keeps_the_firmware_from_starting(sim: Simulator) -> None:
    device = sim.add("sim-001")
    (device.flash_dir / "SAFE").write_text("")
    sim.start("sim-001")
    log = sim.wait_for_log("sim-001", "safe boot: firmware not started")
    wait_for(lambda: not device.running, "the VM to return to its prompt (here: exit)", 10)
    assert "link:" not in log and "device sim-001" not in log
    (device.flash_dir / "SAFE").unlink()
    sim.start("sim-001")
    sim.wait_for_log("sim-001", "link: up")


def test_a_board_whose_tick_counter_wraps_keeps_its_link_and_its_schedule(
    simulators: Callable[..., Simulator], server: NatsServer, gateway: GatewayThread
) -> None:
    # The VM's ticks start 8 s before they wrap (at 2^62 ms in the 64-bit
    # unix port; 2^30 ms, about 12 days, on a board): keepalive pings,
    # socket deadlines, the telemetry schedule, flush timers and asyncio's
    # own task queue all cross the wrap while the board is online.
    import subprocess

    from fleet.paths import TICKS_SHIM, micropython_executable

    probe = subprocess.run(
        [micropython_executable(), "-c", "import time; print(time.ticks_ms(), time.ticks_add(0, -1))"],
        env={**os.environ, "LD_PRELOAD": str(TICKS_SHIM), "FLEET_SIM_TICKS_BEFORE_WRAP_MS": "5000"},
        capture_output=True, text=True, timeout=30,
    )
    ticks, period_minus_one = map(int, probe.stdout.split())
    assert 0 < period_minus_one - ticks <= 5000, probe.stdout  # the shim really puts it near the wrap

    sim = simulators(settings_defaults=FAST, ticks_before_wrap_ms=8000)
    sim.add("sim-001", telemetry_interval_ms=100)
    sim.start("sim-001")
    started = time.monotonic()
    wait_for(lambda: stored_readings(server.url, "sim-001"), "first readings", 15)
    # Well past the wrap: readings keep coming, in order, exactly once.
    wait_for(lambda: time.monotonic() - started > 14, "the wrap, and some time after it", 20, every=0.5)
    before = len(stored_readings(server.url, "sim-001"))
    wait_for(lambda: len(stored_readings(server.url, "sim-001")) >= before + 20, "readings after the wrap", 15)
    readings = stored_readings(server.url, "sim-001")
    seqs = [r.payload["seq"] for r in readings]  # type: ignore[index]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    uptimes = [r.payload["uptime_s"] for r in readings]  # type: ignore[index]
    assert uptimes == sorted(uptimes) and 0 <= uptimes[0] and uptimes[-1] >= 14
    log = sim.devices["sim-001"].log_text()
    assert "link: down" not in log and "restarting" not in log, log[-2000:]
    assert sim.devices["sim-001"].running
