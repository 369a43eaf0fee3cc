"""Fleet tooling: the host side of the fleet firmware (server, gateway, simulator, CLI)."""
import json

from fleet.paths import PROTOCOL_FILE

# One version for the firmware and its tooling, kept in firmware/protocol.json
# (the boards read it there); pyproject.toml and the package.json files follow it.
__version__: str = json.loads(PROTOCOL_FILE.read_text())["firmware"]
