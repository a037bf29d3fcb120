"""Lightning callbacks, one per file."""

from lp_callbacks.callbacks.block_influence import BlockInfluenceMonitor, find_monitor
from lp_callbacks.callbacks.control_evaluation import ControlEvaluationCallback
from lp_callbacks.callbacks.depth_efficiency import DepthEfficiencyMonitor
from lp_callbacks.callbacks.distillation import DistillationCallback
from lp_callbacks.callbacks.layer_freeze import LayerFreezeCallback
from lp_callbacks.callbacks.layer_prune import LayerPruneCallback

__all__ = [
    "BlockInfluenceMonitor",
    "ControlEvaluationCallback",
    "DepthEfficiencyMonitor",
    "DistillationCallback",
    "LayerFreezeCallback",
    "LayerPruneCallback",
    "find_monitor",
]
