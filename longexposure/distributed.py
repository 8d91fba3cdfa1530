"""Data-parallel fine-tuning under `torchrun`, on torch.distributed's DistributedDataParallel.

Started by torchrun (WORLD_SIZE > 1 in the environment), a training run joins the process group (NCCL on
GPUs, gloo on CPUs) and wraps the model in DDP, which all-reduces the trainable parameters' gradients (LoRA's
only, for PEFT: frozen weights have none). Each rank draws the same global batch from the same seed and keeps
its contiguous slice, so a run on N ranks with per-rank batch b trains exactly what one process trains with
batch N x b (packed batches: every token counts alike in the loss mean), and tests can check that. Long
Exposure's patterns are computed per rank from that rank's slice: the predictors are per rank, and nothing
extra crosses the wire. Only rank 0 writes artifacts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> DataParallel | None:
    """The job torchrun started this process in, or None for a single process (WORLD_SIZE unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    return DataParallel(rank=rank, world_size=world, local_rank=local, backend="")


def is_main_process() -> bool:
    """True unless this is a torchrun rank other than 0 (artifacts, logs and tables come from rank 0)."""
    dp = from_env()
    return dp is None or dp.is_main


def join(device: torch.device) -> tuple[DataParallel | None, torch.device]:
    """Join the torchrun job (once per process) and pick this rank's device; (None, device) outside one."""
    dp = from_env()
    if dp is None:
        return None, device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", dp.local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    elif dist.get_backend() != backend:
        raise ValueError(f"the process group uses {dist.get_backend()}, this run needs {backend} on {device}")
    return DataParallel(dp.rank, dp.world_size, dp.local_rank, backend), device


def wrap(model: nn.Module, dp: DataParallel, device: torch.device) -> nn.Module:
    """The model under DDP (gradients of trainable parameters all-reduced in buckets during backward)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,  # gradients live in the buckets: no copy, and fixed addresses for graphs
        static_graph=True,  # the same parameters get gradients every step (what CUDA-graph capture needs)
    )


def global_batch(per_rank: int, dp: DataParallel | None) -> int:
    """Rows each rank draws: the global batch, of which it keeps its own slice."""
    return per_rank * (dp.world_size if dp is not None else 1)


def shard(batch: dict[str, torch.Tensor], dp: DataParallel | None) -> dict[str, torch.Tensor]:
    """This rank's contiguous slice of a global batch (rows rank*b .. (rank+1)*b)."""
    if dp is None:
        return batch
    out = {}
    for name, t in batch.items():
        if t.shape[0] % dp.world_size:
            raise ValueError(f"{name}: a global batch of {t.shape[0]} rows does not split over {dp.world_size} ranks")
        rows = t.shape[0] // dp.world_size
        out[name] = t[dp.rank * rows : (dp.rank + 1) * rows]
    return out
