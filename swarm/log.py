"""One logging set-up for every Swarm process; the level comes from SWARM_LOG_LEVEL."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"
_configured = False


def get_logger(name: str) -> logging.Logger:
    """Return the module's logger, configuring the 'swarm' root handler on first use."""
    global _configured
    if not _configured:
        _configured = True
        level = os.environ.get("SWARM_LOG_LEVEL", "INFO").upper()
        for root_name in ("swarm", "launch", "models"):
            root = logging.getLogger(root_name)
            if not root.handlers:
                handler = logging.StreamHandler(sys.stderr)
                handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
                root.addHandler(handler)
            root.setLevel(level)
            root.propagate = False
    return logging.getLogger(name)
