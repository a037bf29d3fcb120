"""Run by tests/test_distillation.py: KD with a removal at step 2, either in one process (batches of 4) or under
2-process DDP (gloo, CPU, batches of 2 per rank, unshuffled shards: the same global batches).

To run by hand: python tests/ddp_distill_script.py OUT_DIR single|ddp
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from conftest import RandomTokens, TinyLM  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lp_callbacks import DistillationCallback, LayerPruneCallback, get_decoder_layers  # noqa: E402

if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2]
    ddp = mode == "ddp"
    distil = DistillationCallback(teacher="initial", alpha=0.5)
    prune = LayerPruneCallback(num_layers=2, at_steps=[2])
    trainer = pl.Trainer(accelerator="cpu", devices=2 if ddp else 1, strategy="ddp" if ddp else "auto", max_steps=4,
                         logger=False, callbacks=[distil, prune], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=out, deterministic=True,
                         use_distributed_sampler=False)
    module = TinyLM(lr=1e-3)
    data = RandomTokens(length=16, pad=False)
    rank = int(os.environ.get("LOCAL_RANK", 0))  # set by Lightning's launcher in the child; 0 in the parent
    sampler = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False) if ddp else None
    trainer.fit(module, DataLoader(data, batch_size=2 if ddp else 4, sampler=sampler))  # the same global batches
    torch.save({
        "teacher_fingerprint": distil._fingerprint,
        "num_layers": len(get_decoder_layers(module)),
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
    }, out / f"{mode}_rank{trainer.global_rank}.pt")
    if torch.distributed.is_initialized():  # a clean exit: gloo threads abort the process otherwise
        torch.distributed.destroy_process_group()
