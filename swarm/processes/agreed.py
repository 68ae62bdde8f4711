"""What the coordinator and a volunteer share once they hold a state: its round agreement."""

from __future__ import annotations

from pathlib import Path

from swarm.node import SwarmNode
from swarm.round.agreement import RoundAgreement


class AgreedNode(SwarmNode):
    """A node that follows (and may lead) rounds over a state it holds. The agreement exists from
    the moment the node has its state (`hold`); before that, asking for it is an error."""

    _agreement: RoundAgreement | None = None

    @property
    def agreement(self) -> RoundAgreement:
        """The round protocol over this node's state."""
        if self._agreement is None:
            raise RuntimeError("the node holds no state yet")
        return self._agreement

    def hold(self, agreement: RoundAgreement) -> None:
        self._agreement = agreement

    async def save_agreed(self, directory: str | Path) -> None:
        """Save the state if the node holds one (on exit: never a half-applied round)."""
        if self._agreement is not None:
            await self._agreement.save(directory)
