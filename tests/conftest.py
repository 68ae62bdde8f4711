"""Settings for the whole test session.

One intra-op thread per process: the suite runs two pytest workers beside real swarms of up to two
dozen processes on 2 cores, and torch's default (a thread per core in every process, each spinning
while it waits) oversubscribes them until every process runs several times slower. The swarm
processes the tests start inherit the setting through the environment.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # after the environment it reads

torch.set_num_threads(1)
