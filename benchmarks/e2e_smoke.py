"""GPU smoke run of Long Exposure end to end: OPT-1.3B + LoRA with replayed sparsity, MLP only, attention
only, then both; prints per-step wall time and phase times, and dumps tracebacks if a step hangs.

Usage (GPU): LONGEXPOSURE_SHARED=/path/to/shared python3 benchmarks/e2e_smoke.py [SEQ_LEN]
"""

import faulthandler
import sys
import time

import torch

from longexposure.measure import Timer
from longexposure.training import Trainer, TrainingSetup

faulthandler.dump_traceback_later(240, exit=True)
seq = int(sys.argv[1]) if len(sys.argv) > 1 else 512
for mlp, attn in [(True, False), (False, True), (True, True)]:
    t0 = time.time()
    setup = TrainingSetup(
        model="opt-1.3b",
        method="lora",
        batch=4,
        seq_len=seq,
        precision="fp16-amp",
        exposure={"source": "replay", "profile": "reference", "theta": 0.1, "mlp": mlp, "attention": attn},
    )
    tr = Trainer(setup, "cuda")
    print("built", mlp, attn, round(time.time() - t0, 1), flush=True)
    timer = Timer("cuda")
    for i in range(6):
        t1 = time.time()
        loss = tr.step(timer)
        torch.cuda.synchronize()
        print(" step", i, round(time.time() - t1, 3), timer.elapsed_ms(), float(loss), flush=True)
    print(
        tr.exposure.report()["mlp_block_density"], tr.exposure.report()["attention_block_density_of_causal"], flush=True
    )
    del tr
    torch.cuda.empty_cache()
