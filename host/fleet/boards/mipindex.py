"""A mip package index on loopback, served from the pinned libraries that
`make setup` fetched (tools/micropython-deps.json into build/), so
`mpremote mip install --index http://127.0.0.1:PORT umqtt.simple` works with
no internet: for the virtual board in the tests, and for a user flashing
boards on a machine that is offline.

It speaks the layout of micropython-lib's index (micropython.org/pi/v2):

    /package/<mpy version or "py">/<name>/<version>.json
        {"v": 1, "version": ..., "hashes": [[path, short sha256]], "deps": []}
    /file/<first 2 of hash>/<short sha256>
        the file's bytes

For a numeric version that our mpy-cross writes, the modules are compiled
to .mpy, as the real index serves them; "py" serves the sources.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fleet.boards.compile import compile_libraries
from fleet.paths import BUILD_DIR, MICROPYTHON_LIB_DIR, REPO

PINS_FILE = REPO / "tools" / "micropython-deps.json"
SHORT_HASH = 8  # hex characters, as micropython-lib's index uses


def pinned_packages(pins_file: Path = PINS_FILE) -> dict[str, dict]:
    """mip name ("umqtt.simple") -> its pin (version, modules, ...)."""
    pins = json.loads(pins_file.read_text())
    return {name.removeprefix("micropython-"): pin for name, pin in pins.items() if not name.startswith("_")}


class MipIndex:
    def __init__(self, lib_dir: Path = MICROPYTHON_LIB_DIR, mpy_version: int | None = None) -> None:
        self.lib_dir = lib_dir
        self.packages = pinned_packages()
        self.mpy_version = mpy_version  # what our mpy-cross writes; None: serve sources only
        self.files: dict[str, bytes] = {}  # short hash -> bytes
        self.manifests: dict[tuple[str, str], bytes] = {}  # (mpy version or "py", name) -> package json
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.requests: list[str] = []

    def _add(self, data: bytes) -> str:
        short = hashlib.sha256(data).hexdigest()[:SHORT_HASH]
        self.files[short] = data
        return short

    def _build(self) -> None:
        for name, pin in self.packages.items():
            sources = []
            for module in pin["modules"]:
                path = self.lib_dir / module
                if not path.exists():
                    raise FileNotFoundError(f"{path}: not fetched; run `make setup`")
                sources.append((module, path))
            hashes = [[module, self._add(path.read_bytes())] for module, path in sources]
            self.manifests[("py", name)] = self._manifest(pin, hashes)
            if self.mpy_version is not None:
                compiled_dir = BUILD_DIR / "mip-index" / str(self.mpy_version)
                compile_libraries(compiled_dir, self.lib_dir)
                compiled = [
                    [module[:-3] + ".mpy", self._add((compiled_dir / (module[:-3] + ".mpy")).read_bytes())]
                    for module, _ in sources
                ]
                self.manifests[(str(self.mpy_version), name)] = self._manifest(pin, compiled)

    @staticmethod
    def _manifest(pin: dict, hashes: list[list[str]]) -> bytes:
        return json.dumps({"v": 1, "version": pin["version"], "hashes": hashes, "deps": []}).encode()

    def lookup(self, path: str) -> bytes | None:
        parts = path.strip("/").split("/")
        if len(parts) == 4 and parts[0] == "package" and parts[3].endswith(".json"):
            version = parts[3][: -len(".json")]
            pin = self.packages.get(parts[2])
            if pin is None or version not in ("latest", pin["version"]):
                return None
            return self.manifests.get((parts[1], parts[2]))
        if len(parts) == 3 and parts[0] == "file" and parts[2][:2] == parts[1]:
            return self.files.get(parts[2])
        return None

    def start(self) -> str:
        self._build()
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                index.requests.append(self.path)
                body = index.lookup(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # quiet: mpremote prints what it installs

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="mip-index", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> MipIndex:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["MipIndex", "pinned_packages"]
