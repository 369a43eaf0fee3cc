"""A virtual board for mpremote: the MicroPython unix port on a pty, its
REPL bridged to a TCP socket, so `mpremote connect socket://127.0.0.1:PORT
resume ...` copies files to it and runs code on it as it would over USB.
Its working folder is its flash. (Use `resume`: the unix port has no soft
reset.)"""
from __future__ import annotations

import os
import pty
import selectors
import signal
import socket
import subprocess
import threading
import time
import tty
from pathlib import Path

from fleet.paths import micropython_executable, micropython_path
from fleet.boards.romfs import PARTITION_BOOT, new_partition, vm_command


def _catches_sigint(pid: int) -> bool:
    # Linux: the caught-signals mask in /proc; SIGINT is signal 2.
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & 1 << (signal.SIGINT - 1))
    except OSError:
        pass
    return False


class VirtualBoard:
    def __init__(
        self, flash_dir: Path, board: str = "sim", heapsize: str = "256k", bare: bool = False,
        rom_bytes: int | None = None,
    ) -> None:
        """bare: nothing of the repository on the VM's path, only what was
        copied into its flash (and ./lib, where mip installs), like a
        board fresh from the factory; else the firmware runs from the repo.
        rom_bytes: a ROM partition of that size, as a board built with ROMFS
        has (`mpremote romfs deploy` writes it; it is kept beside the flash
        folder, in <flash>.rom); None: none, as the stock builds."""
        self.flash_dir = Path(flash_dir)
        self.rom_bytes = rom_bytes
        self.board = board
        self.heapsize = heapsize
        self.bare = bare
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._listener: socket.socket | None = None
        self._master = -1
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_interrupt = 0.0

    def start(self) -> int:
        """Start the VM on a pty and listen on a free loopback port; returns it."""
        self.flash_dir.mkdir(parents=True, exist_ok=True)
        master, slave = pty.openpty()
        # Raw: no echo, no newline translation. The VM's REPL does both
        # itself, as a board's USB serial port does; mpremote counts bytes.
        tty.setraw(slave)
        # "./lib" ends in "/lib", so mip picks it as a board picks /lib.
        path = ".frozen:./lib" if self.bare else micropython_path(self.board)
        env = dict(os.environ, MICROPYPATH=path)
        self.process = subprocess.Popen(
            self._command(),
            stdin=slave, stdout=slave, stderr=slave, cwd=self.flash_dir, env=env, close_fds=True,
        )
        os.close(slave)
        self._master = master
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="virtual-board", daemon=True)
        self._thread.start()
        return self.port

    @property
    def partition(self) -> Path:
        return self.flash_dir.with_name(self.flash_dir.name + ".rom")

    def _command(self) -> list[str]:
        heap = f"heapsize={self.heapsize}"
        if self.rom_bytes is None:
            return [micropython_executable(), "-X", heap, "-i"]
        new_partition(self.partition, self.rom_bytes)
        return vm_command(["-X", heap, "-i", "-c", PARTITION_BOOT], partition=self.partition)

    def _serve(self) -> None:
        # One client at a time, like a USB serial port. Bytes from the pty
        # with no client connected are dropped, as a serial line would.
        assert self._listener is not None
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, "accept")
        selector.register(self._master, selectors.EVENT_READ, "pty")
        client: socket.socket | None = None
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.2):
                    if key.data == "accept":
                        conn, _ = self._listener.accept()
                        if client is not None:
                            conn.close()  # busy, as a serial port held by another program
                            continue
                        # The REPL's replies are small and mpremote waits
                        # for each: Nagle would hold them back.
                        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        client = conn
                        selector.register(client, selectors.EVENT_READ, "client")
                    elif key.data == "pty":
                        try:
                            data = os.read(self._master, 4096)
                        except OSError:
                            return  # the VM exited
                        if not data:
                            return
                        if client is not None:
                            try:
                                client.sendall(data)
                            except OSError:
                                selector.unregister(client)
                                client.close()
                                client = None
                    elif key.data == "client" and client is not None:
                        data = client.recv(4096)
                        if not data:
                            selector.unregister(client)
                            client.close()
                            client = None
                        else:
                            if b"\x03" in data:
                                self._interrupt()
                            os.write(self._master, data)
        finally:
            if client is not None:
                client.close()
            selector.close()

    def _interrupt(self) -> None:
        # A board's USB serial driver turns Ctrl-C into KeyboardInterrupt
        # in the running program; that is how mpremote stops a running
        # firmware. The unix port, running code, reads no input and waits
        # for SIGINT instead, so the bridge sends it (the byte goes through
        # too, for the REPL). Only while the VM catches SIGINT: early in its
        # start-up it is still at the default, which would kill it. Once
        # per burst, since mpremote may send several.
        assert self.process is not None
        now = time.monotonic()
        if now - self._last_interrupt > 0.3 and _catches_sigint(self.process.pid):
            self._last_interrupt = now
            os.kill(self.process.pid, signal.SIGINT)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self._listener is not None:
            self._listener.close()
        if self._master >= 0:
            os.close(self._master)
            self._master = -1

    def __enter__(self) -> VirtualBoard:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["VirtualBoard"]
