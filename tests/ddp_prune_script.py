"""Run by tests/test_layer_prune.py: 2-process DDP (gloo, CPU) pruning at step 2, then 2 more steps.

Each rank draws a *different* random choice (seed = rank): the callback must make every rank remove rank 0's.
To run by hand: python tests/ddp_prune_script.py OUT_DIR
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from conftest import TinyLM, loader  # noqa: E402

from lp_callbacks import get_decoder_layers  # noqa: E402
from lp_callbacks.callbacks.layer_prune import LayerPruneCallback  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher in the child; 0 in the parent
    prune = LayerPruneCallback(num_layers=2, at_steps=[2], criterion="random", seed=rank)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False, callbacks=[prune],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out)
    module = TinyLM(lr=1e-2)
    trainer.fit(module, loader(length=32, batch_size=4))  # DistributedSampler: each rank its own shard
    torch.save({
        "removed": [r["original_layers"] for r in prune.removed],
        "num_layers": len(get_decoder_layers(module)),
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "steps": trainer.global_step,
    }, out / f"rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():  # a clean exit: gloo threads abort the process otherwise
        torch.distributed.destroy_process_group()
