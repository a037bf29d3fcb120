"""lp_callbacks: Lightning callbacks that make a transformer's depth visible and actionable while it trains."""

from lp_callbacks.architectures import get_decoder_layers
from lp_callbacks.callbacks import (
    BlockInfluenceMonitor,
    ControlEvaluationCallback,
    DepthEfficiencyMonitor,
    DistillationCallback,
    LayerFreezeCallback,
    LayerPruneCallback,
    find_monitor,
)
from lp_callbacks.checkpoint import load_pruned_checkpoint, restore_pruned_architecture
from lp_callbacks.events import DepthEvent
from lp_callbacks.measure import DepthMeasurement, block_ablation, block_influence, measure_depth
from lp_callbacks.schedules import GradualSchedule
from lp_callbacks.surgery import drop_layers

__version__ = "0.1.0"

__all__ = [
    "BlockInfluenceMonitor",
    "ControlEvaluationCallback",
    "DepthEfficiencyMonitor",
    "DepthEvent",
    "DepthMeasurement",
    "DistillationCallback",
    "GradualSchedule",
    "LayerFreezeCallback",
    "LayerPruneCallback",
    "block_ablation",
    "block_influence",
    "drop_layers",
    "find_monitor",
    "get_decoder_layers",
    "load_pruned_checkpoint",
    "measure_depth",
    "restore_pruned_architecture",
]
