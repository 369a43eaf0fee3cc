"""The gateway: the boards' MQTT topics in, a registry, telemetry, configuration and commands out, and the fleet API."""
