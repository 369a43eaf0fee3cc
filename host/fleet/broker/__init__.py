"""Talking to NATS: the connection every part opens, JetStream helpers, the embedded nats-server, where it runs."""
