"""`torchrun ... tests/ddp_worker.py OUT_DIR [train.py flags]`: train.run, then save this rank's weights
(and, with RECORD_DROPOUT=1, its first dropout mask) to OUT_DIR/rank{R}.pt, so that test_distributed.py
can compare the ranks. FAKE_STEP_RATE=r: rank R's measured step rate is r (1 + R)."""
import os
import sys
from pathlib import Path

import torch

import train
import training
from distributed import world

if __name__ == "__main__":
    masks = []
    if os.environ.get("RECORD_DROPOUT"):
        forward = torch.nn.Dropout.forward

        def recording(self, x):
            out = forward(self, x)
            if self.training and not masks:
                masks.append(out == 0)
            return out
        torch.nn.Dropout.forward = recording
    if os.environ.get("FAKE_STEP_RATE"):  # --max-minutes: each rank "measures" its own rate, as real ranks may
        training.measure_rate = lambda *a, **k: float(os.environ["FAKE_STEP_RATE"]) * (1 + int(os.environ["RANK"]))
    method, state = train.run(train.build_parser().parse_args(sys.argv[2:]))
    model, ema, rank = method.parts[0].model, method.parts[0].ema, world()[0]
    torch.save({"model": model.state_dict(), "ema": ema.module.state_dict(), "history": state["history"],
                "masks": masks}, Path(sys.argv[1]) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
