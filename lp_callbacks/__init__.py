"""lp_callbacks: Lightning callbacks that make a transformer's depth visible and actionable while it trains."""

from lp_callbacks.architectures import get_decoder_layers
from lp_callbacks.callbacks import BlockInfluenceMonitor, find_monitor
from lp_callbacks.measure import DepthMeasurement, block_influence, measure_depth

__version__ = "0.1.0"

__all__ = [
    "BlockInfluenceMonitor",
    "DepthMeasurement",
    "block_influence",
    "find_monitor",
    "get_decoder_layers",
    "measure_depth",
]
