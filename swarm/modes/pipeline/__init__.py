"""Pipelined replicas: weak peers that together train one replica, stage by stage.

- ``mode``: the TrainingMode (roles, contributions, the outer step's subspace projection).
- ``worker``: a peer's local work in the pipeline mode (full replica, stage, or spare).
- ``options``: the mode's knobs (compression ratio, wire dtype, what full replicas hold in span(U)).
- ``groups``: who is a full replica, who is which stage of which group (the coordinator's rule).
- ``schedule``: one inner step of a stage: GPipe over several micro-batches in flight.
- ``link``: the stage link over libp2p streams (``/swarm/stage/1``): mailbox, deadlines, traffic.
- ``wire``: the activation message (forward activations, backward gradients), versioned, validated.
"""

from swarm.modes.pipeline.mode import MODE

__all__ = ["MODE"]
