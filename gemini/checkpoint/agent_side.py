"""What a worker agent hosts for the checkpoint backend of the run.

``none`` and ``disk`` need nothing on the agent. The memory backends (added
with them) own shared-memory slots and, for ``replicated``, a transport
server that receives peers' checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gemini.cluster.job import JobSpec
    from gemini.cluster.store import Store


class AgentServices:
    """Nothing to host: the default for backends without node-side state."""

    def start(self) -> dict[str, Any]:
        """Start serving; returns what peers need to know (e.g. an address)."""
        return {}

    def tick(self) -> None:
        """Called from the agent's control loop (answers inventory requests)."""

    def inventory(self) -> dict[str, list[int]]:
        """Verified complete steps held here, per source rank."""
        return {}

    def close(self) -> None:
        """Stop serving and release memory."""


def make_agent_services(job: JobSpec, node: int, store: Store) -> AgentServices:
    return AgentServices()
