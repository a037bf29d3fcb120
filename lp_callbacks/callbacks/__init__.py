"""Lightning callbacks, one per file."""

from lp_callbacks.callbacks.block_influence import BlockInfluenceMonitor, find_monitor

__all__ = ["BlockInfluenceMonitor", "find_monitor"]
