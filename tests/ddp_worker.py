"""`torchrun ... tests/ddp_worker.py OUT_DIR [train.py flags]`: train.run, then save this rank's weights
to OUT_DIR/rank{R}.pt, so that test_distributed.py can compare the ranks."""
import sys
from pathlib import Path

import torch

import train

if __name__ == "__main__":
    model, ema, state = train.run(train.build_parser().parse_args(sys.argv[2:]))
    rank = train.world()[0]
    torch.save({"model": model.state_dict(), "ema": ema.module.state_dict(), "history": state["history"]},
               Path(sys.argv[1]) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
