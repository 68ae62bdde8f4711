"""SPES: the experts of a mixture-of-experts model sharded over peers.

- ``mode``: the TrainingMode (expert ownership, what a peer sends, the merge warm-up after the outer step).
- ``experts``: the maths: which peer owns which expert, expert similarity and merging.
"""

from swarm.modes.spes.mode import MODE

__all__ = ["MODE"]
