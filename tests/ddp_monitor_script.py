"""Run by tests/test_block_influence_monitor.py: 2-process DDP (gloo, CPU), each rank writes what its monitor holds.

To run by hand: python tests/ddp_monitor_script.py OUT_DIR
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from conftest import TinyLM, loader  # noqa: E402

from lp_callbacks import BlockInfluenceMonitor  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    monitor = BlockInfluenceMonitor(block_sizes=(1, 2))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False, callbacks=[monitor],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out)
    # 2 steps x 2 ranks x 4: the 16 samples once each, in whatever order Lightning's DistributedSampler deals them
    trainer.fit(TinyLM(lr=0.0), loader(length=16, batch_size=4))
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "bi": monitor.block_influence.tolist(),
        "angular2": monitor.angular_distances(2).tolist(),
        "tokens": monitor.tokens_seen,
    }))
    if torch.distributed.is_initialized():  # a clean exit: gloo threads abort the process otherwise
        torch.distributed.destroy_process_group()
