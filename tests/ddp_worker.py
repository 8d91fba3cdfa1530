"""Run under torchrun by tests/test_distributed.py: a few LoRA steps of opt-tiny (or OPT-1.3B's layer count at
d 64 for replay), data-parallel over the ranks (DDP or FSDP); rank 0 saves the gradients and the losses."""

from __future__ import annotations

import argparse
import json

import torch

from longexposure.distributed import is_main_process, shard
from longexposure.measure import Timer
from longexposure.training import Trainer, TrainingSetup

EXPOSURES = {
    "dense": (None, "opt-tiny", {}),
    "all-active": (
        {"source": "all-active", "attn_block": 16, "mlp_block": 32, "mlp_backend": "torch-gather",
         "attention_backend": "eager"},
        "opt-tiny",
        {},
    ),
    "all-active-mlp-lora": (  # LoRA on the MLP too: the exposed MLP reads its factors (FSDP gathers them anew)
        {"source": "all-active", "attn_block": 16, "mlp_block": 32, "mlp_backend": "torch-gather",
         "attention_backend": "eager"},
        "opt-tiny",
        {},
    ),
    "replay": (
        {"source": "replay", "profile": "reference", "attn_block": 16, "mlp_block": 64, "mlp_backend": "torch-gather",
         "attention_backend": "eager"},
        "opt-1.3b",
        {"hidden_size": 64, "word_embed_proj_dim": 64, "num_attention_heads": 4},
    ),
}  # fmt: skip


def train(kind: str, batch: int, steps: int, engine: str = "ddp") -> tuple[dict[str, torch.Tensor], list[float], dict]:
    exposure, model, shape = EXPOSURES[kind]
    targets = {"target_modules": ["q_proj", "v_proj", "fc1", "fc2"]} if kind.endswith("mlp-lora") else {}
    setup = TrainingSetup(
        model=model,
        method="lora",
        batch=batch,
        seq_len=32,
        precision="fp32",
        attn="sdpa",
        lr=1e-2,
        exposure=exposure,
        method_options={"dropout": 0.0, **targets},
        model_options={"dropout": 0.0, "attention_dropout": 0.0, **shape},
        data_parallel=engine,
    )
    trainer = Trainer(setup, "cpu", seed=0)
    # the gradients of one global batch (DDP all-reduces them in backward), then a few ordinary steps
    batch = shard(next(trainer.batches), trainer.dp)
    trainer.forward(**batch, use_cache=False).loss.backward()
    # (under FSDP each rank holds a shard of a gradient: the whole one is gathered)
    grads = {n: _whole(p.grad).detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.optimizer.zero_grad(set_to_none=True)
    losses = [float(trainer.step(Timer("cpu"))) for _ in range(steps)]
    return grads, losses, trainer.describe()


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", default="dense", choices=sorted(EXPOSURES))
    parser.add_argument("--batch", type=int, default=2, help="per-rank batch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--engine", default="ddp", help="data_parallel: ddp or fsdp")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    grads, losses, info = train(args.kind, args.batch, args.steps, args.engine)
    if is_main_process():
        torch.save(grads, args.out)
        with open(args.out + ".json", "w") as f:
            json.dump({"losses": losses, "data_parallel": info.get("data_parallel")}, f)
