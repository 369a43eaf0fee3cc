#!/usr/bin/env python3
"""Type-check the firmware and each board profile against its port's stubs.

Each board's files (firmware/*.py and boards/<board>/*.py, as `fleet flash`
copies them) are checked by pyright against the published stubs of that
board's MicroPython port, pinned in tools/firmware-stubs.json: an import of a
module the port lacks, a function, class or constant it does not have, or a
call that does not match its signature is an error.

The ports' stubs define the same modules (machine, network, ...) differently,
so each board's set is pip-installed into its own folder, build/stubs/<board>/,
and pyright is pointed at that folder alone: its stdlib/ replaces pyright's
bundled typeshed (MicroPython's json, os, asyncio, ... are not CPython's),
and an empty site-packages stands in for the host interpreter's, so nothing
from CPython can satisfy an import. micropython-lib's umqtt.simple, which
`make setup` fetched into build/micropython-lib/, is checked from its source.

The firmware is unannotated MicroPython. Missing annotations are not errors,
and neither is what pyright infers from them: an attribute set to None in
__init__ and filled in later is typed None, so its later uses are reported
against None. Those reports are dropped (--show-inferred-none shows them);
everything else pyright reports fails the check.

    tools/typecheck_firmware.py                      # every board
    tools/typecheck_firmware.py --board esp32        # one board
    tools/typecheck_firmware.py --board pico_w FILE  # FILE instead of the board's files
    tools/typecheck_firmware.py --install-only       # fetch the stubs (make setup)
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS_FILE = Path(__file__).with_name("firmware-stubs.json")
FIRMWARE_DIR = ROOT / "firmware"
BOARDS_DIR = ROOT / "boards"
MICROPYTHON_LIB_DIR = ROOT / "build" / "micropython-lib"

# What pyright reports beyond its "standard" mode defaults, and why.
PYRIGHT_SETTINGS: dict[str, object] = {
    "typeCheckingMode": "standard",
    # Checked against the board's port, not the host: set explicitly so the
    # interpreter running this tool changes nothing.
    "pythonVersion": "3.11",
    "pythonPlatform": "Linux",
    # Stub-only packages have no source beside them, by design.
    "reportMissingModuleSource": "none",
    # Unannotated `x = None` initialisers make every later use Optional:
    # inference about the firmware, not about the port's API.
    "reportOptionalMemberAccess": "none",
    "reportOptionalSubscript": "none",
    "reportOptionalIterable": "none",
    "reportOptionalCall": "none",
    "reportOptionalOperand": "none",
    # Comparisons of decoded JSON values (query.py) infer unions such as
    # int | str; what MicroPython does with them is tested in the VM.
    "reportOperatorIssue": "none",
    # Only `# pyright: ignore[rule]` silences a line, and only that rule: a
    # bare `# type: ignore` would hide any port error on the line too.
    "enableTypeIgnoreComments": False,
}

# Pyright's wording when the type it reports against is a None it inferred
# from an unannotated initialiser (see the module docstring).
_INFERRED_NONE = re.compile(r'for class "None"|"None" is not iterable|is not assignable to "None"')
_INFERRED_NONE_RULES = {"reportAttributeAccessIssue", "reportGeneralTypeIssues"}


@dataclass(frozen=True)
class Diagnostic:
    path: Path
    line: int  # 1-based, as editors show it
    column: int  # 1-based
    severity: str
    message: str
    rule: str

    def format(self) -> str:
        where = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        first, *rest = self.message.splitlines()
        text = f"{where}:{self.line}:{self.column}: {self.severity}: {first}"
        if self.rule:
            text += f" [{self.rule}]"
        return "\n".join([text, *("    " + line.strip() for line in rest)])

    @property
    def about_inferred_none(self) -> bool:
        return self.rule in _INFERRED_NONE_RULES and bool(_INFERRED_NONE.search(self.message))


@dataclass(frozen=True)
class StubPin:
    name: str
    version: str
    sha256: str

    def requirement(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


@dataclass(frozen=True)
class BoardStubs:
    board: str
    pins: tuple[StubPin, ...]
    skip: dict[str, str]  # firmware file name -> why it is not checked on this board

    @property
    def folder(self) -> Path:
        return ROOT / "build" / "stubs" / self.board

    def describe(self) -> str:
        return ", ".join(f"{pin.name} {pin.version}" for pin in self.pins)


def load_boards(pins_file: Path = PINS_FILE) -> dict[str, BoardStubs]:
    data = json.loads(pins_file.read_text())
    packages = data["packages"]
    boards = {}
    for board, spec in data["boards"].items():
        pins = tuple(StubPin(name, packages[name]["version"], packages[name]["sha256"]) for name in spec["stubs"])
        boards[board] = BoardStubs(board, pins, dict(spec.get("skip", {})))
    return boards


def _stamp_path() -> Path:
    return ROOT / "build" / "stubs" / ".installed.json"


def install_stubs(stubs: BoardStubs) -> Path:
    """The board's stub folder, installed with pip if its pins changed."""
    stamp_path = _stamp_path()
    stamps = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
    wanted = [pin.requirement() for pin in stubs.pins]
    if stamps.get(stubs.board) == wanted and stubs.folder.is_dir():
        return stubs.folder
    # Installed beside the final folder and renamed into place, so a failed
    # or interrupted download never leaves a half-filled stub folder.
    partial = stubs.folder.with_name(stubs.folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    requirements = stubs.folder.with_name(f"{stubs.board}-requirements.txt")
    requirements.write_text("\n".join(wanted) + "\n")
    print(f"typecheck: installing stubs for {stubs.board}: {stubs.describe()}", flush=True)
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--only-binary=:all:", "--require-hashes", "--no-compile",
        "--target", str(partial), "-r", str(requirements),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    requirements.unlink()
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise SystemExit(f"typecheck: pip could not install the {stubs.board} stubs:\n{result.stderr.strip()}")
    shutil.rmtree(stubs.folder, ignore_errors=True)
    partial.rename(stubs.folder)
    stamps[stubs.board] = wanted
    stamp_path.write_text(json.dumps(stamps, indent=1) + "\n")
    return stubs.folder


def board_files(stubs: BoardStubs) -> list[Path]:
    firmware = [path for path in sorted(FIRMWARE_DIR.glob("*.py")) if path.name not in stubs.skip]
    return firmware + sorted((BOARDS_DIR / stubs.board).glob("*.py"))


def pyright_config(stubs: BoardStubs, stub_folder: Path) -> Path:
    """A pyrightconfig for the board, written under build/typecheck/."""
    work = ROOT / "build" / "typecheck"
    # Pyright takes the host interpreter's stdlib and site-packages as search
    # paths unless given a venv; an empty one leaves only the stubs.
    (work / "no-host-python" / "lib" / "site-packages").mkdir(parents=True, exist_ok=True)
    config = {
        **PYRIGHT_SETTINGS,
        "typeshedPath": str(stub_folder),
        "stubPath": str(stub_folder),
        "venvPath": str(work),
        "venv": "no-host-python",
        # What is on sys.path on the board: the profile, the firmware, the
        # mip-installed libraries.
        "extraPaths": [str(BOARDS_DIR / stubs.board), str(FIRMWARE_DIR), str(MICROPYTHON_LIB_DIR)],
    }
    path = work / f"{stubs.board}.json"
    path.write_text(json.dumps(config, indent=1) + "\n")
    return path


def run_pyright(config: Path, files: list[Path]) -> list[Diagnostic]:
    # --outputjson also keeps the pyright wrapper from asking PyPI for a newer version.
    command = [sys.executable, "-m", "pyright", "--outputjson", "-p", str(config), *map(str, files)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise SystemExit(
            f"typecheck: pyright failed (exit {result.returncode}):\n{result.stdout}{result.stderr}"
        ) from None
    diagnostics = []
    for entry in report.get("generalDiagnostics", []):
        if entry["severity"] not in ("error", "warning"):
            continue
        start = entry.get("range", {}).get("start", {"line": 0, "character": 0})
        diagnostics.append(
            Diagnostic(
                path=Path(entry["file"]),
                line=start["line"] + 1,
                column=start["character"] + 1,
                severity=entry["severity"],
                message=entry["message"],
                rule=entry.get("rule", ""),
            )
        )
    return diagnostics


def check_board(stubs: BoardStubs, files: list[Path] | None = None) -> tuple[list[Diagnostic], list[Diagnostic]]:
    """(problems, reports about inferred None) for the board's files, or for `files`."""
    stub_folder = install_stubs(stubs)
    config = pyright_config(stubs, stub_folder)
    diagnostics = run_pyright(config, files if files is not None else board_files(stubs))
    problems = [d for d in diagnostics if not d.about_inferred_none]
    inferred_none = [d for d in diagnostics if d.about_inferred_none]
    return problems, inferred_none


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--board", action="append", help="a board under boards/ (repeatable; default: all)")
    parser.add_argument("--install-only", action="store_true", help="install the stubs and stop")
    parser.add_argument("--show-inferred-none", action="store_true", help="also print the reports that are dropped")
    parser.add_argument("files", nargs="*", type=Path, help="check these instead of the board's files")
    args = parser.parse_args(argv)
    boards = load_boards()
    unknown = sorted(set(args.board or []) - set(boards))
    if unknown:
        parser.error(f"no stubs pinned for {', '.join(unknown)} in {PINS_FILE.name}")
    chosen = [boards[name] for name in (args.board or boards)]
    if args.install_only:
        for stubs in chosen:
            install_stubs(stubs)
        _stamp_path().touch()  # make's target: up to date even when nothing was reinstalled
        return 0
    files = [path.resolve() for path in args.files] or None
    failed = False
    for stubs in chosen:
        problems, inferred_none = check_board(stubs, files)
        for diagnostic in problems + (inferred_none if args.show_inferred_none else []):
            print(diagnostic.format())
        checked = len(files) if files else len(board_files(stubs))
        verdict = f"{len(problems)} problem(s)" if problems else "ok"
        print(
            f"typecheck {stubs.board}: {checked} file(s) against {stubs.describe()}: {verdict}"
            f" ({len(inferred_none)} report(s) about unannotated None initialisers not counted)"
        )
        failed = failed or bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
