"""Fleet tooling: the host side of the fleet firmware (server, gateway, simulator, CLI)."""

__version__ = "0.1.0"
