"""The fleet's state on NATS: desired configuration, command records, the registry's questions, live queries, nicknames.

The gateway and the clients both build on this layer; it knows nothing of either.
"""
