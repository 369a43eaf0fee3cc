"""Simulated boards: the real firmware, unchanged, in the MicroPython unix port.

Each device is one `micropython` process running firmware/main.py with the
`boards/sim` profile, its working folder standing in for the board's flash
(settings.json, state.json and whatever the firmware writes survive a
restart of that device). Devices reach the broker through the MQTT host and
port written into their settings; the simulator rewrites those two fields
at every start, and keeps the rest (the device id above all).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.sim.faults import LinkMode, LinkProxy, ProxyLoop
from fleet.boards.compile import compile_firmware, compile_libraries
from fleet.paths import FIRMWARE_DIR, TICKS_SHIM, micropython_executable, micropython_path
from fleet.boards.romfs import ROM_BOOT, ROM_PATH, build_image, vm_command

DEFAULT_HEAP = "128k"


def sim_device_id(index: int) -> str:
    return f"sim-{index:03d}"


def sim_unique_id(device_id: str) -> str:
    """A stable stand-in for machine.unique_id(), 8 bytes as hex."""
    return hashlib.sha256(device_id.encode()).hexdigest()[:16]


@dataclass
class SimDevice:
    device_id: str
    flash_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0
    # The board name it reports (the sim profile standing in for a pico_w,
    # say, in fleet-scale tests); None: "sim".
    reports_as: str | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def mount_flash(folder: Path, size: int) -> None:
    """A tmpfs of `size` bytes on `folder` (needs root: CAP_SYS_ADMIN)."""
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
        capture_output=True, text=True, timeout=30,
    )
    if result.returncode != 0:
        raise RuntimeError(f"a flash size limit mounts a tmpfs, which needs root: {result.stderr.strip()}")


def unmount_flash(folder: Path) -> None:
    if os.path.ismount(folder):
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


@dataclass
class Simulator:
    """A set of simulated boards sharing one broker."""

    data_dir: Path
    mqtt_host: str
    mqtt_port: int
    heap: str = DEFAULT_HEAP
    board: str = "sim"
    firmware_dir: Path = FIRMWARE_DIR
    settings_defaults: dict[str, Any] = field(default_factory=dict)
    # With fault injection on, each device reaches the broker through its
    # own LinkProxy, which the tests (and `fleet sim`) can cut or slow down.
    fault_injection: bool = False
    # Run the .mpy files mpy-cross makes (what `fleet flash` copies) instead
    # of the sources.
    compiled: bool = False
    # Run the compiled firmware in place from a ROM image outside the heap,
    # as a board with a ROM partition does (see fleet.romfs); implies compiled.
    romfs: bool = False
    # A size for each device's flash folder, in bytes: a tmpfs of that size
    # is mounted on it (root only), so a full flash is a real ENOSPC from
    # the kernel, as LittleFS gives on a board. None: no limit.
    flash_bytes: int | None = None
    # Start each board's tick counter this many ms before it wraps (at 2^62
    # in the 64-bit unix port), through an LD_PRELOAD shim that moves the
    # VM's CLOCK_MONOTONIC (tools/ticks_offset.c, built by `make setup`).
    # None: the port's own ticks.
    ticks_before_wrap_ms: int | None = None
    # A server in operator mode: each board gets its own identity, as
    # `fleet provision` gives a real one (its id as MQTT username, a JWT
    # for its own topics as password). Called with the device id.
    credentials: Callable[[str], str] | None = None
    devices: dict[str, SimDevice] = field(default_factory=dict)
    proxies: dict[str, LinkProxy] = field(default_factory=dict)
    _proxy_loop: ProxyLoop | None = None
    _rom_image: Path | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)

    # -- provisioning -------------------------------------------------------------
    def add(self, device_id: str, **settings: Any) -> SimDevice:
        """Create (or reuse) a device's flash folder and write its settings."""
        flash = self.data_dir / "devices" / device_id
        flash.mkdir(parents=True, exist_ok=True)
        if self.flash_bytes is not None and not os.path.ismount(flash):
            mount_flash(flash, self.flash_bytes)
        device = self.devices.get(device_id) or SimDevice(device_id, flash, self.data_dir / "logs" / f"{device_id}.log")
        device.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.devices[device_id] = device
        current = self.read_settings(device_id)
        merged = {
            "device_id": device_id,
            "wifi_ssid": "simnet",
            **self.settings_defaults,
            **current,
            **settings,
            "mqtt_host": self.mqtt_host,
            "mqtt_port": self._device_port(device_id),
        }
        if self.credentials is not None and not merged.get("mqtt_password"):
            merged["mqtt_user"] = device_id
            merged["mqtt_password"] = self.credentials(device_id)
        self.write_settings(device_id, merged)
        return device

    def _device_port(self, device_id: str) -> int:
        if not self.fault_injection:
            return self.mqtt_port
        proxy = self.proxies.get(device_id)
        if proxy is None:
            if self._proxy_loop is None:
                self._proxy_loop = ProxyLoop()
            proxy = LinkProxy(self.mqtt_host, self.mqtt_port)
            self._proxy_loop.call(proxy.start())
            self.proxies[device_id] = proxy
        return proxy.port

    # -- faults ---------------------------------------------------------------------
    def set_link(self, device_id: str, mode: LinkMode | str, delay: float | None = None) -> None:
        """Cut ("drop", "blackhole") or restore ("pass") a device's network."""
        if not self._proxy_loop or device_id not in self.proxies:
            raise RuntimeError("fault injection is off for this simulator")
        self._proxy_loop.call(self.proxies[device_id].set_mode(LinkMode(mode), delay))

    def settings_path(self, device_id: str) -> Path:
        return self.data_dir / "devices" / device_id / "settings.json"

    def read_settings(self, device_id: str) -> dict[str, Any]:
        try:
            loaded = json.loads(self.settings_path(device_id).read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return loaded if isinstance(loaded, dict) else {}

    def write_settings(self, device_id: str, settings: dict[str, Any] | str) -> None:
        """Write settings.json as given: a dict, or raw text (tests write bad files)."""
        text = settings if isinstance(settings, str) else json.dumps(settings, indent=1)
        self.settings_path(device_id).write_text(text)

    # -- processes ------------------------------------------------------------------
    def rom_image(self) -> Path:
        """The firmware's ROM image, built afresh at the first start of a device."""
        if self._rom_image is None:
            self._rom_image = build_image(self.board, self.data_dir / "romfs", self.data_dir / "firmware.romfs")
        return self._rom_image

    def command(self) -> list[str]:
        """The VM and its arguments for one device."""
        heap = f"heapsize={self.heap}"
        if self.romfs:
            return vm_command(["-X", heap, "-c", ROM_BOOT], image=self.rom_image())
        return [micropython_executable(), "-X", heap, "-c", "import main"]

    def environment(self, device: SimDevice, reset_cause: str) -> dict[str, str]:
        env = dict(os.environ)
        if self.romfs:
            env["MICROPYPATH"] = ROM_PATH
        elif self.compiled:
            compiled = self.data_dir / "mpy"
            compile_firmware(self.board, compiled)
            compile_libraries(compiled / "lib")
            env["MICROPYPATH"] = ":".join([".frozen", str(compiled), str(compiled / "lib")])
        else:
            env["MICROPYPATH"] = micropython_path(self.board, self.firmware_dir)
        env["FLEET_SIM_UNIQUE_ID"] = sim_unique_id(device.device_id)
        env["FLEET_SIM_RESET_CAUSE"] = reset_cause
        if device.reports_as:
            env["FLEET_SIM_BOARD_NAME"] = device.reports_as
        if self.ticks_before_wrap_ms is not None:
            if not TICKS_SHIM.exists():
                raise RuntimeError(f"{TICKS_SHIM} is missing: run `make setup` (it needs a C compiler)")
            env["LD_PRELOAD"] = str(TICKS_SHIM)
            env["FLEET_SIM_TICKS_BEFORE_WRAP_MS"] = str(self.ticks_before_wrap_ms)
        return env

    def start(self, device_id: str, reset_cause: str = "power_on") -> SimDevice:
        device = self.devices.get(device_id) or self.add(device_id)
        if device.running:
            return device
        with device.log_path.open("ab") as log:
            device.process = subprocess.Popen(
                self.command(),
                cwd=device.flash_dir,
                env=self.environment(device, reset_cause),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the simulator, which stops the boards
            )
        device.starts += 1
        return device

    def start_fleet(self, count: int, **settings: Any) -> list[SimDevice]:
        devices = [self.add(sim_device_id(i), **settings) for i in range(1, count + 1)]
        for device in devices:
            self.start(device.device_id)
        return devices

    def kill(self, device_id: str) -> None:
        """Pull the plug: SIGKILL, no goodbye (the broker sends the last will)."""
        self._signal(device_id, signal.SIGKILL)

    def freeze(self, device_id: str) -> None:
        """Stop the process without closing its socket: a hung board."""
        self._signal(device_id, signal.SIGSTOP, wait=False)

    def thaw(self, device_id: str) -> None:
        self._signal(device_id, signal.SIGCONT, wait=False)

    def power_cycle(self, device_id: str) -> SimDevice:
        self.kill(device_id)
        return self.start(device_id, reset_cause="power_on")

    def stop(self, device_id: str, timeout: float = 5.0) -> None:
        device = self.devices[device_id]
        if not device.running or device.process is None:
            return
        device.process.send_signal(signal.SIGCONT)
        device.process.terminate()
        try:
            device.process.wait(timeout)
        except subprocess.TimeoutExpired:
            device.process.kill()
            device.process.wait()

    def stop_all(self) -> None:
        for device_id in list(self.devices):
            self.stop(device_id)
        if self._proxy_loop:
            for proxy in self.proxies.values():
                self._proxy_loop.call(proxy.stop())
            self._proxy_loop.close()
            self._proxy_loop = None
            self.proxies.clear()
        if self.flash_bytes is not None:
            for device in self.devices.values():
                unmount_flash(device.flash_dir)

    def _signal(self, device_id: str, sig: signal.Signals, wait: bool = True) -> None:
        device = self.devices[device_id]
        if device.process is None or device.process.poll() is not None:
            return
        device.process.send_signal(sig)
        if wait:
            device.process.wait()

    # -- observation ----------------------------------------------------------------
    def wait_for_log(self, device_id: str, needle: str, timeout: float = 10.0, count: int = 1) -> str:
        """Wait until the device's console shows `needle` (count times); return the log."""
        deadline = time.monotonic() + timeout
        device = self.devices[device_id]
        while True:
            text = device.log_text()
            if text.count(needle) >= count:
                return text
            if time.monotonic() > deadline:
                raise TimeoutError(f"{device_id}: {needle!r} not seen {count}x within {timeout} s; log:\n{text[-3000:]}")
            time.sleep(0.02)

    def __enter__(self) -> "Simulator":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
