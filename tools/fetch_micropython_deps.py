#!/usr/bin/env python3
"""Fetch the MicroPython libraries the simulator needs, pinned, into build/.

micropython-lib's packages on PyPI are bare sdists (no setup.py, no
pyproject.toml), so `pip install` refuses them. This tool asks the package
index for the pinned file by name (PEP 691 JSON), checks its sha256, and
extracts only the listed modules into build/micropython-lib/, which the
simulator puts on MICROPYPATH. Nothing is copied into the repository.

Re-running is cheap: the archive is cached in build/cache/ and modules whose
archive hash is already recorded are left alone.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS = Path(__file__).with_name("micropython-deps.json")
DEFAULT_INDEX = "https://pypi.org/simple"


def index_url() -> str:
    return os.environ.get("FLEET_PYPI_SIMPLE", DEFAULT_INDEX).rstrip("/")


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def find_file_url(package: str, filename: str) -> str:
    request = urllib.request.Request(
        f"{index_url()}/{normalise(package)}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        listing = json.load(response)
    for entry in listing.get("files", []):
        if entry["filename"] == filename:
            return str(entry["url"])
    raise SystemExit(f"fetch: {filename} is not listed for {package} on {index_url()}")


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch_archive(package: str, pin: dict, cache: Path) -> Path:
    archive = cache / pin["filename"]
    if archive.exists() and sha256_of(archive) == pin["sha256"]:
        return archive
    url = find_file_url(package, pin["filename"])
    print(f"fetch: downloading {pin['filename']}")
    partial = archive.with_suffix(".part")
    with urllib.request.urlopen(url, timeout=120) as response:
        partial.write_bytes(response.read())
    actual = sha256_of(partial)
    if actual != pin["sha256"]:
        partial.unlink()
        raise SystemExit(
            f"fetch: sha256 mismatch for {pin['filename']}: expected {pin['sha256']}, got {actual}"
        )
    partial.replace(archive)
    return archive


def extract_modules(archive: Path, pin: dict, lib: Path) -> None:
    prefix = archive.name.removesuffix(".tar.gz") + "/"
    with tarfile.open(archive, "r:gz") as tar:
        for module in pin["modules"]:
            member = tar.getmember(prefix + module)
            source = tar.extractfile(member)
            if source is None:
                raise SystemExit(f"fetch: {module} is not a file in {archive.name}")
            target = lib / module
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, default=ROOT / "build")
    args = parser.parse_args(argv)
    pins = {k: v for k, v in json.loads(PINS.read_text()).items() if not k.startswith("_")}
    cache = args.build / "cache"
    lib = args.build / "micropython-lib"
    cache.mkdir(parents=True, exist_ok=True)
    lib.mkdir(parents=True, exist_ok=True)
    stamp_path = lib / ".installed.json"
    installed = json.loads(stamp_path.read_text()) if stamp_path.exists() else {}
    for package, pin in pins.items():
        present = all((lib / m).exists() for m in pin["modules"])
        if present and installed.get(package) == pin["sha256"]:
            continue
        archive = fetch_archive(package, pin, cache)
        extract_modules(archive, pin, lib)
        installed[package] = pin["sha256"]
        print(f"fetch: {package} {pin['version']} -> {lib}")
    stamp_path.write_text(json.dumps(installed, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
