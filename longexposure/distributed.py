"""Data-parallel fine-tuning under `torchrun`, on torch.distributed's DDP or FSDP (the `data_parallel` registry).

Started by torchrun (WORLD_SIZE > 1 in the environment), a training run joins the process group (NCCL on
GPUs, gloo on CPUs) and wraps the model:
- `ddp` (the default): DistributedDataParallel, which all-reduces the trainable parameters' gradients (LoRA's
  only, for PEFT: frozen weights have none); every rank holds the whole model.
- `fsdp`: FSDP2's `fully_shard` on every decoder layer and the root, for models that do not fit on one GPU:
  each rank holds a 1/N shard of every parameter, all-gathered for a layer's forward and backward, and the
  gradients are reduce-scattered. It does not combine with CUDA graphs or torch.compile here, nor with the
  Long Exposure predictor refresh (which reads fc1's weights outside a forward, where they are sharded).

Each rank draws the same global batch from the same seed and keeps
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

from longexposure.registry import DATA_PARALLEL


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


def wrap(model: nn.Module, dp: DataParallel, device: torch.device, engine: str = "ddp") -> nn.Module:
    """The model under the named `data_parallel` engine; what to call for a forward."""
    return DATA_PARALLEL.get(engine)(model, dp, device)


@DATA_PARALLEL.register("ddp", help="DistributedDataParallel: whole model per rank, gradients all-reduced")
def wrap_ddp(model: nn.Module, dp: DataParallel, device: torch.device) -> nn.Module:
    """The model under DDP (gradients of trainable parameters all-reduced in buckets during backward)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,  # gradients live in the buckets: no copy, and fixed addresses for graphs
        static_graph=True,  # the same parameters get gradients every step (what CUDA-graph capture needs)
    )


@DATA_PARALLEL.register("fsdp", help="FSDP2 fully_shard per decoder layer: parameters sharded over the ranks")
def wrap_fsdp(model: nn.Module, dp: DataParallel, device: torch.device) -> nn.Module:
    """The model sharded in place by FSDP2 (each decoder layer its own unit, then the root); returns it.

    FSDP shards only contiguous parameters, so a parameter another module re-laid out (the neuron-block
    backends keep fc2 column-major) gets its row-major layout back first; an exposed MLP then re-lays out its
    own copy of the gathered weight on each forward."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from longexposure.arch import decoder_layers

    with torch.no_grad():
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    mesh = init_device_mesh(device.type, (dp.world_size,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state_dict(model: nn.Module, dp: DataParallel | None, engine: str) -> dict[str, torch.Tensor] | None:
    """Under FSDP, the model's whole state dict, for saving: gathered with a collective that every rank must
    call, kept on rank 0 only (on the CPU). None otherwise (a rank holds whole parameters)."""
    if dp is None or engine != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def describe(dp: DataParallel, engine: str, per_rank_batch: int) -> str:
    """What a result row says of its data parallelism."""
    return (
        f"{engine.upper()} over {dp.world_size} ranks ({dp.backend}), per-rank batch {per_rank_batch}, global batch "
        f"{per_rank_batch * dp.world_size}; this row is rank {dp.rank}'s"
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
