"""KV store, agents, transport and launchers."""
