"""Built-in MLP backends (registry `mlp_backend`): `dense`, `torch-gather`, `triton`.

Every backend is a class with one small interface, so a model-patching layer can swap them by name:

    backend = MLP_BACKENDS.get("triton")(block_size=64)
    backend.prepare(fc1.weight, fc1.bias, fc2.weight, fc2.bias)    # once, at patch time
    y = backend(x, active_block_ids, n_active, fc1_lora=..., fc2_lora=...)   # every step

- `prepare(fc1_weight, fc1_bias, fc2_weight, fc2_bias)` keeps references to the tensors (gradients flow
  to whichever require grad; frozen ones get none) and does any one-time layout change in place: the
  sparse backends re-lay fc2.weight's storage column-major (`ops.neuron_block_mlp.neuron_major_`), which
  keeps the parameter object and shape. Returns the backend.
- `__call__(x, active_block_ids=None, n_active=None, *, fc1_lora=None, fc2_lora=None)`: x (..., d_model)
  -> (..., d_model) = fc2(relu(fc1(x))) with the ReLU output kept only on the active neuron blocks.
  `active_block_ids` (capacity,) int32 increasing, the first `n_active` ((1,) int32 device tensor, or
  None for all) valid. `fc1_lora` / `fc2_lora` are `ops.neuron_block_mlp.LowRank` adapters (LoRA A/B,
  scaling, fc1 dropout); the op adds them where the math puts them (fc1's before the ReLU, fc2's from
  the compact activations), so callers pass the adapters instead of wrapping fc1/fc2 with peft layers.

Capabilities are registry metadata: `devices` ("cuda", "cpu", "cpu-interpret": CPU under
TRITON_INTERPRET=1), `dtypes`, `supports_backward`, `uses_active_set` (False for `dense`, which is the
unmodified baseline and ignores the active set). A backend that cannot run on the given device/dtype
raises `BackendUnavailable` saying why; nothing falls back to another backend.

`torch-gather` needs the active count on the host: with a device `n_active` it syncs (`.item()`); it is
the "library kernels" baseline (index_select of the active weight rows + cuBLAS), not the fast path.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from longexposure.backends import BackendUnavailable, why_triton_cannot_run
from longexposure.ops.neuron_block_mlp import LowRank, check_active_set, neuron_block_mlp, neuron_major, neuron_major_
from longexposure.registry import MLP_BACKENDS

_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class MLPBackend:
    """Common interface of the MLP backends (see the module docstring)."""

    name: ClassVar[str] = ""
    devices: ClassVar[tuple[str, ...]] = ("cuda", "cpu")
    dtypes: ClassVar[tuple[torch.dtype, ...]] = _ALL_DTYPES

    def __init__(self, block_size: int = 64):
        self.block_size = block_size
        self.fc1_weight: torch.Tensor | None = None

    def check(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Raise BackendUnavailable if this backend cannot run on `device` with `dtype`."""
        device = torch.device(device)
        if device.type not in {d.split("-")[0] for d in self.devices}:
            raise BackendUnavailable(f"mlp backend {self.name!r} runs on {self.devices}, not on {device}")
        if dtype not in self.dtypes:
            raise BackendUnavailable(f"mlp backend {self.name!r} supports {self.dtypes}, not {dtype}")

    def prepare(self, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, in_place: bool = True) -> MLPBackend:
        """Hold the weights the calls multiply. `in_place`: a backend that wants another layout may re-lay out
        these tensors themselves (the model's own parameters, at patch time); False: it makes its own copy."""
        self.check(fc1_weight.device, fc1_weight.dtype)
        if fc1_weight.shape[0] % self.block_size:
            raise ValueError(f"fc1_weight: ffn={fc1_weight.shape[0]} is not a multiple of block_size={self.block_size}")
        self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias = fc1_weight, fc1_bias, fc2_weight, fc2_bias
        return self

    def _prepared(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        if self.fc1_weight is None:
            raise RuntimeError(f"mlp backend {self.name!r}: call prepare(...) before calling the backend")
        return self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias

    def __call__(self, x: torch.Tensor, active_block_ids: torch.Tensor | None = None,
                 n_active: torch.Tensor | None = None, *, fc1_lora: LowRank | None = None,
                 fc2_lora: LowRank | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(block_size={self.block_size})"


def _lora(out: torch.Tensor, inp: torch.Tensor, lora: LowRank | None, a: torch.Tensor | None = None,
          b: torch.Tensor | None = None) -> torch.Tensor:
    if lora is None:
        return out
    inp = lora.dropout(inp) if lora.dropout is not None else inp
    return out + F.linear(F.linear(inp, lora.a if a is None else a), lora.b if b is None else b) * lora.scaling


class NeuronMajorMLP(MLPBackend):
    """A sparse backend that reads fc2 by neuron blocks, so holds it column-major (`neuron_major_`)."""

    def prepare(self, fc1_weight, fc1_bias, fc2_weight, fc2_bias, *, in_place: bool = True):
        w2 = neuron_major_(fc2_weight) if in_place else neuron_major(fc2_weight)
        return super().prepare(fc1_weight, fc1_bias, w2, fc2_bias)


@MLP_BACKENDS.register("dense", devices=("cuda", "cpu"), dtypes=_ALL_DTYPES, supports_backward=True,
                       uses_active_set=False, help="the unmodified MLP: every neuron, the active set ignored")
class DenseMLP(MLPBackend):
    """The unmodified MLP (nn.Linear -> ReLU -> nn.Linear): every neuron, the active set ignored."""

    name = "dense"

    def __call__(self, x, active_block_ids=None, n_active=None, *, fc1_lora=None, fc2_lora=None):
        w1, b1, w2, b2 = self._prepared()
        self.check(x.device, x.dtype)
        h = torch.relu(_lora(F.linear(x, w1, b1), x, fc1_lora))
        return _lora(F.linear(h, w2, b2), h, fc2_lora)


@MLP_BACKENDS.register("torch-gather", devices=("cuda", "cpu"), dtypes=_ALL_DTYPES, supports_backward=True,
                       uses_active_set=True, help="index_select the active weight rows, then dense matmuls on them")
class TorchGatherMLP(NeuronMajorMLP):
    """index_select the active weight rows, then cuBLAS/CPU matmuls on the gathered (compact) weights."""

    name = "torch-gather"

    def __call__(self, x, active_block_ids=None, n_active=None, *, fc1_lora=None, fc2_lora=None):
        w1, b1, w2, b2 = self._prepared()
        self.check(x.device, x.dtype)
        if active_block_ids is None:
            raise ValueError("active_block_ids: torch-gather needs the active block ids")
        check_active_set(active_block_ids, n_active, x)
        ids = active_block_ids if n_active is None else active_block_ids[: int(n_active.reshape(()).item())]
        neurons = (ids.long()[:, None] * self.block_size
                   + torch.arange(self.block_size, device=ids.device)).reshape(-1)
        lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        z = F.linear(x, w1.index_select(0, neurons), None if b1 is None else b1.index_select(0, neurons))
        if fc1_lora is not None:
            z = _lora(z, x, fc1_lora, b=fc1_lora.b.index_select(0, neurons))
        h = torch.relu(z)
        w2c = w2.t().index_select(0, neurons)  # (n_active * block, d_model), contiguous rows
        y = h @ w2c if b2 is None else torch.addmm(b2, h, w2c)
        if fc2_lora is not None:
            y = _lora(y, h, fc2_lora, a=fc2_lora.a.index_select(1, neurons))
        return y.reshape(*lead, y.shape[-1])


@MLP_BACKENDS.register("triton", devices=("cuda", "cpu-interpret"), dtypes=_ALL_DTYPES, supports_backward=True,
                       uses_active_set=True, help="neuron-block Triton operator: fc1 to a compact buffer, fc2 from it")
class TritonMLP(NeuronMajorMLP):
    """The neuron-block Triton operator (kernels/neuron_block_mlp.py): fc1 into a compact buffer, fc2 from it."""

    name = "triton"

    def check(self, device, dtype):
        super().check(device, dtype)
        try:
            from longexposure.kernels import neuron_block_mlp as kernels
        except ImportError as exc:
            raise BackendUnavailable(f"mlp backend 'triton' needs Triton: {exc}") from exc
        why = why_triton_cannot_run(torch.device(device), kernels.INTERPRET)
        if why:
            raise BackendUnavailable(f"mlp backend 'triton' cannot run here: {why}")

    def __call__(self, x, active_block_ids=None, n_active=None, *, fc1_lora=None, fc2_lora=None):
        w1, b1, w2, b2 = self._prepared()
        if active_block_ids is None:
            raise ValueError("active_block_ids: the triton backend needs the active block ids")
        return neuron_block_mlp(x, active_block_ids, w1, b1, w2, b2, block_size=self.block_size, n_active=n_active,
                                fc1_lora=fc1_lora, fc2_lora=fc2_lora)


def capabilities(name: str) -> dict[str, Any]:
    """Registry metadata of one backend (devices, dtypes, supports_backward, uses_active_set)."""
    return dict(MLP_BACKENDS.entry(name).meta)
