"""One round of the swarm: who leads it, what a leader accepts, what everyone applies.

- ``agreement``: waiting for, leading and applying a round; the canonical manifest; catching up.
- ``leadership``: who leads a round and which manifest counts (pure functions).
- ``admission``: what a leader accepts of each submission (checks, strikes).
- ``robust``: robust aggregation of the accepted contributions (clipping, zero/copy/direction refusals).
- ``evidence``: equivocation proofs, checked by every node.
- ``payloads``: encoding this node's contribution, serving and fetching payloads by digest.
- ``overlap``: where round r+1's inner steps start while round r settles.
"""
