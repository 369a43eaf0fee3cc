"""Pushed text on the sim board's display: the PNG frame it writes is
compared with the framebuf rendering of the expected text in the VM."""
from __future__ import annotations

import ast
import asyncio
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from support import GatewayThread, wait_for, wait_registered

from fleet.paths import micropython_executable, micropython_path
from fleet.broker.server import NatsServer
from fleet.sim.simulator import Simulator


@pytest.fixture
def sim(tmp_path: Path, server: NatsServer, gateway: GatewayThread) -> Iterator[Simulator]:
    simulator = Simulator(tmp_path / "sim", server.host, server.mqtt_port, settings_defaults={"keepalive_s": 4})
    try:
        simulator.start(simulator.add("sim-001").device_id)
        simulator.wait_for_log("sim-001", "link: up")
        wait_registered(server.url, "sim-001")
        yield simulator
    finally:
        simulator.stop_all()


def png_pixels(path: Path) -> bytes:
    """The 1-bit rows of a PNG written by the sim board (filter bytes removed)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat, width, height = 8, b"", 0, 0
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[at + 8 + length:at + 12 + length])[0]
        if kind == b"IHDR":
            width, height, depth = struct.unpack(">IIB", body[:9])
            assert depth == 1
        elif kind == b"IDAT":
            idat += body
        at += 12 + length
    raw = zlib.decompress(idat)
    stride = width // 8
    rows = [raw[r * (stride + 1):(r + 1) * (stride + 1)] for r in range(height)]
    assert all(row[0] == 0 for row in rows)
    return b"".join(row[1:] for row in rows)


def expected_pixels(text: str) -> bytes:
    """The framebuf rendering of `text` by firmware/display.py, in the VM."""
    script = (
        "import framebuf, sys\n"
        "from display import render\n"
        "buf = bytearray(1024)\n"
        "class S(framebuf.FrameBuffer):\n"
        "    def show(self): pass\n"
        "render(S(buf, 128, 64, framebuf.MONO_HLSB), sys.argv[1])\n"
        "print(buf.hex())\n"
    )
    env = dict(os.environ, MICROPYPATH=micropython_path("sim"))
    out = subprocess.run([micropython_executable(), "-c", script, text], env=env, capture_output=True, text=True, check=True)
    return bytes.fromhex(out.stdout.strip())


def shown(sim: Simulator, text: str) -> bool:
    return f"display: {text}" in sim.devices["sim-001"].log_text()


def test_pushed_text_is_drawn_wrapped_on_the_frame(sim: Simulator, server: NatsServer) -> None:
    from fleet.cli.main import main

    text = "Hello fleet, this text wraps onto more lines"
    assert main(["display", "sim-001", text, "--nats", server.url]) == 0
    wait_for(lambda: shown(sim, text), "the text on the console", 10)
    frame = sim.devices["sim-001"].flash_dir / "display.png"
    wait_for(lambda: frame.exists() and png_pixels(frame) == expected_pixels(text), "the frame", 10)
    assert png_pixels(frame) != expected_pixels("something else")


def test_a_plain_nats_publish_shows_text_and_unicode_beyond_the_font_is_replaced(sim: Simulator, server: NatsServer) -> None:
    async def publish(subject: str, data: bytes) -> None:
        nc = await nats.connect(server.url)
        await nc.publish(subject, data)
        await nc.flush()
        await nc.close()

    asyncio.run(publish("fleet.sim-001.display", b"Jeremy"))
    frame = sim.devices["sim-001"].flash_dir / "display.png"
    wait_for(lambda: frame.exists() and png_pixels(frame) == expected_pixels("Jeremy"), "Jeremy on the frame", 10)
    asyncio.run(publish("fleet.display", "Zoë € \xff".encode() + b"\xff"))
    wait_for(lambda: shown(sim, "Zo? ? ??"), "the replaced characters", 10)
    assert sim.devices["sim-001"].running


def test_standard_input_is_read_with_a_dash(sim: Simulator, server: NatsServer) -> None:
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "fleet", "display", "sim-001", "-", "--nats", server.url],
        input="from a pipe\n", text=True, capture_output=True, env=env, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    wait_for(lambda: shown(sim, "from a pipe"), "piped text", 10)


def test_wrapping_fits_sixteen_by_eight() -> None:
    script = "from display import wrap\nprint(wrap('a' * 40 + ' tail ' + ' '.join(['w'] * 80)))"
    env = dict(os.environ, MICROPYPATH=micropython_path("sim"))
    out = subprocess.run([micropython_executable(), "-c", script], env=env, capture_output=True, text=True, check=True)
    lines = ast.literal_eval(out.stdout)  # the VM printed a list of strings
    assert len(lines) == 8 and all(len(line) <= 16 for line in lines)
    assert lines[:3] == ["a" * 16, "a" * 16, "a" * 8 + " tail w"] and lines[-1].endswith("~")
