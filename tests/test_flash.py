"""`fleet flash` against a virtual board: the real mpremote copies the
compiled firmware, its mip dependencies (from a local index serving the
pinned cache) and the settings into a bare unix-port VM, which then boots
the firmware from its flash and comes online in the fleet."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import GatewayThread, stored_readings, wait_for

from fleet.cli.main import main as fleet
from fleet.boards.flash import BoardInfo, FlashError, check_board, check_settings_file, mpy_cross_version, packages_for
from fleet.boards.mipindex import MipIndex
from fleet.paths import BOARDS_DIR, FIRMWARE_DIR
from fleet.boards.provision import HIDDEN
from fleet.broker.server import NatsServer
from fleet.boards.virtualboard import VirtualBoard

MPREMOTE = str(Path(sys.executable).with_name("mpremote"))


@pytest.fixture
def index() -> Iterator[MipIndex]:
    with MipIndex(mpy_version=mpy_cross_version()[0]) as running:
        yield running


@pytest.fixture
def bare_board(tmp_path: Path) -> Iterator[VirtualBoard]:
    with VirtualBoard(tmp_path / "flash", bare=True) as board:
        yield board


def provision(tmp_path: Path, server: NatsServer, device: str, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "settings.json"
    os.environ["FLEET_MQTT_PASSWORD"] = "not-for-your-eyes"
    try:
        rc = fleet([
            "provision", device, "--wifi-ssid", "lab", "--mqtt-host", server.host,
            "--mqtt-port", str(server.mqtt_port), "--set", "telemetry_interval_ms=200", "--out", str(out),
        ])
    finally:
        del os.environ["FLEET_MQTT_PASSWORD"]
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "not-for-your-eyes" not in printed.out + printed.err
    assert json.loads(printed.out)["mqtt_password"] == HIDDEN
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    return out


def flash_command(board: VirtualBoard, settings: Path, index: MipIndex) -> list[str]:
    """`fleet flash` of the sim firmware onto the virtual board, packages from the local index."""
    return [
        "flash", "--board", "sim", "--port", f"socket://127.0.0.1:{board.port}",
        "--settings", str(settings), "--index", index.url, "--json",
    ]


def test_flash_puts_the_firmware_on_a_virtual_board_that_boots_it_and_comes_online(
    tmp_path: Path, server: NatsServer, gateway: GatewayThread, index: MipIndex, bare_board: VirtualBoard,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = provision(tmp_path, server, "flashed-1", capsys)
    rc = fleet(flash_command(bare_board, settings, index))
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    report = json.loads(printed.out)
    flash = bare_board.flash_dir
    assert "device.mpy" in report["copied"] and "settings.json" in report["copied"]
    assert (flash / "main.py").exists() and (flash / "device.mpy").exists() and (flash / "board.mpy").exists()
    assert not (flash / "device.py").exists()  # compiled, not sources
    assert (flash / "lib" / "umqtt" / "simple.mpy").exists()  # from mip, through the local index
    assert any(r.startswith("/package/") for r in index.requests)
    assert json.loads((flash / "settings.json").read_text())["device_id"] == "flashed-1"
    assert "mpy v" in printed.err and "copy device.mpy" in printed.err  # progress

    # The board runs what was copied: nothing of the repository is on its path.
    readings = wait_for(lambda: stored_readings(server.url, "flashed-1"), "readings from the flashed board", 30)
    assert readings[0].device == "flashed-1"
    assert (flash / "log").is_dir()  # its store-and-forward log, in its own flash


def test_a_second_flash_copies_only_what_changed_even_with_the_firmware_running(
    tmp_path: Path, server: NatsServer, gateway: GatewayThread, index: MipIndex, bare_board: VirtualBoard,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = provision(tmp_path, server, "flashed-2", capsys)
    args = flash_command(bare_board, settings, index)
    assert fleet(args) == 0
    capsys.readouterr()
    wait_for(lambda: stored_readings(server.url, "flashed-2"), "readings after the first flash", 30)
    # A stale source beside its compiled module would be imported instead of it.
    (bare_board.flash_dir / "device.py").write_text("raise SystemExit('stale source')\n")

    assert fleet(args) == 0  # mpremote interrupts the running firmware, as over USB
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert report["copied"] == [], report
    assert report["removed"] == ["device.py"]
    assert "device.mpy" in report["unchanged"] and "settings.json" in report["unchanged"]
    before = len(stored_readings(server.url, "flashed-2"))
    wait_for(lambda: len(stored_readings(server.url, "flashed-2")) > before + 2, "readings after the second flash", 30)


def test_flash_refuses_a_board_whose_micropython_is_too_old() -> None:
    old = BoardInfo(micropython=(1, 19, 1), mpy=6, platform="rp2", path=["", "/lib"], hashes={})
    with pytest.raises(FlashError, match="runs MicroPython 1.19.1; this firmware needs 1.21 or newer"):
        check_board(old, (6, 3))
    older_mpy = BoardInfo(micropython=(1, 22, 0), mpy=5, platform="rp2", path=["", "/lib"], hashes={})
    with pytest.raises(FlashError, match="loads .mpy v5, mpy-cross writes v6"):
        check_board(older_mpy, (6, 3))
    check_board(BoardInfo(micropython=(1, 24, 1), mpy=6 | 2 << 8, platform="rp2", path=[""], hashes={}), (6, 3))


def test_flash_refuses_bad_settings_before_touching_the_board(tmp_path: Path) -> None:
    bad = tmp_path / "settings.json"
    bad.write_text(json.dumps({"wifi_ssid": "lab", "mqtt_host": "h", "mqtt_port": 99999}))
    with pytest.raises(FlashError, match="mqtt_port: must be from 1 to 65535"):
        check_settings_file(bad)
    bad.write_text("{not json")
    with pytest.raises(FlashError, match="not a readable JSON file"):
        check_settings_file(bad)
    bad.write_text(json.dumps({"mqtt_host": "h"}))
    with pytest.raises(FlashError, match="wifi_ssid: missing"):
        check_settings_file(bad)


def test_provision_takes_no_secret_on_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = fleet(["provision", "b1", "--wifi-ssid", "lab", "--mqtt-host", "h", "--set", "wifi_password=hunter2",
                "--out", str(tmp_path / "s.json")])
    err = capsys.readouterr().err
    assert rc == 1 and "never given on the command line" in err and "hunter2" not in err
    assert not (tmp_path / "s.json").exists()


def test_the_mip_packages_list_every_firmware_and_profile_file() -> None:
    # firmware/ and each profile are mip packages; a file missing from
    # package.json would be missing on a board installed that way.
    shipped = {p.name for p in FIRMWARE_DIR.iterdir() if p.suffix in (".py", ".json") and p.name != "package.json"}
    manifest = json.loads((FIRMWARE_DIR / "package.json").read_text())
    assert {target for target, _ in manifest["urls"]} == shipped
    for board in ("sim", "pico_w", "esp32"):
        profile = json.loads((BOARDS_DIR / board / "package.json").read_text())
        assert {t for t, _ in profile["urls"]} == {p.name for p in (BOARDS_DIR / board).glob("*.py")}
    assert packages_for("pico_w") == ["umqtt.simple", "ssd1306"]
    assert packages_for("sim") == ["umqtt.simple"]


def test_mpremote_installs_the_firmware_as_a_mip_package(index: MipIndex, bare_board: VirtualBoard) -> None:
    port = f"socket://127.0.0.1:{bare_board.port}"
    result = subprocess.run(
        [MPREMOTE, "connect", port, "resume", "mip", "install", "--target", ".", "--index", index.url,
         str(FIRMWARE_DIR / "package.json"), str(BOARDS_DIR / "sim" / "package.json"),
         "+", "exec", "import device, board; print('imports', board.NAME)"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0 and "imports sim" in result.stdout, result.stdout + result.stderr
    assert (bare_board.flash_dir / "device.py").read_bytes() == (FIRMWARE_DIR / "device.py").read_bytes()
    assert (bare_board.flash_dir / "umqtt" / "simple.mpy").exists()  # its dependency, from the index


@pytest.fixture
def rom_board(tmp_path: Path) -> Iterator[VirtualBoard]:
    with VirtualBoard(tmp_path / "flash", bare=True, rom_bytes=128 * 1024) as board:
        yield board


def test_flash_romfs_puts_the_firmware_in_the_rom_partition_and_the_board_runs_it_in_place(
    tmp_path: Path, server: NatsServer, gateway: GatewayThread, index: MipIndex, rom_board: VirtualBoard,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = provision(tmp_path, server, "flashed-rom", capsys)
    args = flash_command(rom_board, settings, index) + ["--romfs"]
    flash = rom_board.flash_dir
    # A copy of the firmware on the flash would be imported before /rom's.
    (flash / "device.mpy").write_bytes(b"stale, and not even bytecode")
    assert fleet(args) == 0
    printed = capsys.readouterr()
    report = json.loads(printed.out)
    assert report["rom"] == "deployed" and sorted(report["copied"]) == ["main.py", "settings.json"], report
    assert "device.mpy" in report["removed"]
    assert "deploying the ROM image" in printed.err
    assert rom_board.partition.read_bytes()[:3] == b"\xd2\xcd\x31"  # a ROMFS, written by mpremote romfs deploy
    # Only main.py and the settings on the flash: the board runs the rest from /rom.
    assert not [p.name for p in flash.iterdir() if p.suffix in (".mpy", ".py") and p.name != "main.py"]
    wait_for(lambda: stored_readings(server.url, "flashed-rom"), "readings from the board running from ROM", 30)

    assert fleet(args) == 0  # again: the partition holds that image already
    report = json.loads(capsys.readouterr().out)
    assert report["rom"] == "unchanged" and report["copied"] == [] and report["removed"] == [], report
    before = len(stored_readings(server.url, "flashed-rom"))
    wait_for(lambda: len(stored_readings(server.url, "flashed-rom")) > before + 2, "readings after the second flash", 30)


def test_flash_romfs_refuses_a_board_without_a_rom_partition(
    tmp_path: Path, server: NatsServer, index: MipIndex, bare_board: VirtualBoard, capsys: pytest.CaptureFixture[str],
) -> None:
    settings = provision(tmp_path, server, "no-rom", capsys)
    assert fleet(flash_command(bare_board, settings, index) + ["--romfs"]) == 1
    assert "no ROM partition" in capsys.readouterr().err
    assert not (bare_board.flash_dir / "main.py").exists()  # nothing was copied
