"""The virtual board: the unix port's REPL on a pty, bridged to TCP, driven
by the real mpremote exactly as over USB (with `resume`: no soft reset)."""
from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.boards.virtualboard import VirtualBoard

MPREMOTE = str(Path(sys.executable).with_name("mpremote"))


@pytest.fixture
def board(tmp_path: Path) -> Iterator[VirtualBoard]:
    with VirtualBoard(tmp_path / "flash") as virtual:
        yield virtual


def mpremote(board: VirtualBoard, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MPREMOTE, "connect", f"socket://127.0.0.1:{board.port}", "resume", *args],
        capture_output=True, text=True, timeout=30,
    )


def test_mpremote_runs_code_and_copies_files_into_the_flash_folder(board: VirtualBoard, tmp_path: Path) -> None:
    result = mpremote(board, "exec", "print(6 * 7)")
    assert result.returncode == 0 and result.stdout.strip() == "42", result.stderr
    source = tmp_path / "hello.py"
    source.write_text("GREETING = 'hi from the flash'\n")
    result = mpremote(board, "cp", str(source), ":hello.py", "+", "exec", "import hello; print(hello.GREETING)")
    assert result.returncode == 0 and "hi from the flash" in result.stdout, result.stderr
    assert (board.flash_dir / "hello.py").read_text() == source.read_text()
    listing = mpremote(board, "ls", ":")
    assert "hello.py" in listing.stdout


def test_garbage_on_the_socket_does_not_break_the_board(board: VirtualBoard) -> None:
    with socket.create_connection(("127.0.0.1", board.port), timeout=5) as garbage:
        garbage.sendall(b"\x00\xff not python at all )]}\r\n")
    result = mpremote(board, "exec", "print('still here')")
    assert result.returncode == 0 and "still here" in result.stdout, result.stderr
    assert board.process is not None and board.process.poll() is None
