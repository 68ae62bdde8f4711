"""Pipelined replicas: weak peers that together train one replica, stage by stage.

- ``wire``: the activation message (forward activations, backward gradients), versioned, validated.
- ``link``: the stage link over libp2p streams (``/swarm/stage/1``): mailbox, deadlines, traffic.
- ``groups``: who is a full replica, who is which stage of which group (the coordinator's rule).
- ``worker``: a peer's local work in the pipeline mode (full replica, stage, or spare).
- ``schedule``: one inner step of a stage: GPipe over several micro-batches in flight.
"""
