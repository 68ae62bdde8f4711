"""The simulator: the production round code, a coordinator and N peers in one process, on virtual time.

clock.py (the virtual-time event loop), network.py (links, records, profiles), node.py (SimNode:
the real SwarmNode over simulated records), actors.py (the coordinator and what every node shares),
peer.py (a volunteer), hostile.py (attackers), faults.py, invariants.py, runner.py (one seeded run).
See docs/simulation.md.
"""
