"""Clients of the fleet: commands, configuration and telemetry as the CLI (and any program) uses them."""
