"""What runs as a process: a volunteer peer, the coordinator, and what only they use.

- ``volunteer``: the peer `join-swarm` runs (trains, submits, follows rounds).
- ``coordinator``: the process `swarm-coordinator` runs (run description, roles, round leader, status page).
- ``roles``: the coordinator's role table and signed roster (membership).
- ``admission``: whom the coordinator admits (the run's admission policy), and how a refused peer learns it.
- ``statesync``: downloading the agreed state from donors.
"""
