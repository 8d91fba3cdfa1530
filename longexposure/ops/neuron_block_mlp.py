"""Neuron-block MLP: reference, weight-layout preparation, functional wrapper and the torch.library op.

The operator computes an OPT-style MLP over a runtime set of active neuron blocks (paper Sec. VI-B):

    z = x W1^T + b1 (+ scaling1 * dropout(x) A1^T B1^T)        W1 (ffn, d), A1 (r1, d), B1 (ffn, r1)
    h = relu(z) * m          m: 1 on the neurons of active blocks, 0 elsewhere
    y = h W2^T + b2 (+ scaling2 * h A2^T B2^T)                 W2 (d, ffn), A2 (r2, ffn), B2 (d, r2)

The reference below is exactly that: dense math on the masked activation, so its gradients are the
masked ones (zero rows of W1/b1/B1 and zero columns of W2/A2 outside the active blocks).

LoRA is handled inside the op where it must be: the fc1 low-rank term enters before the ReLU, so the
op takes u = scaling1 * dropout(x) A1^T (computed here in torch, so autograd reaches A1 and x) and B1,
and adds u B1[act]^T in the fc1 kernel; for fc2 the op also returns v = h A2[:, act]^T from the
compact activations, and the wrapper adds scaling2 * v B2^T in torch (autograd reaches B2). The op
returns gradients for u, B1 and A2. fc2 LoRA dropout is not supported (it would act on h inside the op).

Weights: the Triton kernels read fc1.weight (ffn, d) and fc2.weight^T (ffn, d) as neuron-major
operands, so an active block is `block_size` whole rows. `neuron_major_` re-lays fc2.weight's storage
column-major once at patch time (the parameter keeps its object, shape and dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:  # the reference must import without Triton
    from longexposure.kernels import neuron_block_mlp as _kernels
except ImportError:  # pragma: no cover - platforms without Triton
    _kernels = None

__all__ = [
    "LowRank",
    "check_active_set",
    "is_neuron_major",
    "neuron_block_mlp",
    "neuron_block_mlp_reference",
    "neuron_mask",
    "neuron_major_",
]


@dataclass
class LowRank:
    """A LoRA adapter on one linear layer: out += scaling * b(a(dropout(in))).

    Attributes:
        a: lora_A weight, (r, in_features).
        b: lora_B weight, (out_features, r).
        scaling: lora_alpha / r.
        dropout: applied to the layer input before `a` (fc1 only), or None.
    """

    a: torch.Tensor
    b: torch.Tensor
    scaling: float = 1.0
    dropout: Callable[[torch.Tensor], torch.Tensor] | None = None


def check_active_set(active_block_ids: object, n_active: object, x: object = None) -> None:
    """TypeError naming the argument for a non-tensor active set (ids as a list, the count as an int).

    Every path reads their dtype/device, which made these an AttributeError. A Python int count is not
    converted: that would copy it to the device on every call, which a CUDA-graph step cannot do.
    """
    if x is not None and not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor (..., d_model), got {type(x).__name__}")
    if not isinstance(active_block_ids, torch.Tensor):
        raise TypeError(
            f"active_block_ids: expected a 1-D int32 torch.Tensor of block ids, got {type(active_block_ids).__name__}"
        )
    if n_active is not None and not isinstance(n_active, torch.Tensor):
        raise TypeError(
            f"n_active: expected a (1,) int32 torch.Tensor on the device, or None, got {type(n_active).__name__}"
        )


def _count(active_block_ids: torch.Tensor, n_active: torch.Tensor | None) -> int:
    return active_block_ids.numel() if n_active is None else int(n_active.reshape(()).item())


def neuron_mask(
    active_block_ids: torch.Tensor, num_neurons: int, block_size: int, n_active: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean (num_neurons,) mask of the neurons in the first `n_active` active blocks (host sync)."""
    check_active_set(active_block_ids, n_active)
    blocks = torch.zeros(num_neurons // block_size, dtype=torch.bool, device=active_block_ids.device)
    blocks[active_block_ids[: _count(active_block_ids, n_active)].long()] = True
    return blocks.repeat_interleave(block_size)


def neuron_block_mlp_reference(
    x: torch.Tensor,
    active_block_ids: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    *,
    block_size: int,
    n_active: torch.Tensor | None = None,
    fc1_lora: LowRank | None = None,
    fc2_lora: LowRank | None = None,
) -> torch.Tensor:
    """Eager dense reference: the MLP with the ReLU output masked to the active blocks.

    Args:
        x: (..., d_model).
        active_block_ids: (capacity,) int; the first `n_active` (default: all) are active.
        fc1_weight, fc1_bias: (ffn, d_model), (ffn,) or None.
        fc2_weight, fc2_bias: (d_model, ffn), (d_model,) or None.
        block_size: neurons per block.
        fc1_lora, fc2_lora: optional LoRA adapters on fc1 / fc2.

    Returns:
        (..., d_model): relu(x W1^T + b1 [+ lora]) * m, then W2^T + b2 [+ lora].
    """
    mask = neuron_mask(active_block_ids, fc1_weight.shape[0], block_size, n_active)
    z = F.linear(x, fc1_weight, fc1_bias)
    if fc1_lora is not None:
        xd = fc1_lora.dropout(x) if fc1_lora.dropout is not None else x
        z = z + fc1_lora.scaling * F.linear(F.linear(xd, fc1_lora.a), fc1_lora.b)
    h = torch.where(mask, torch.relu(z), torch.zeros((), dtype=z.dtype, device=z.device))
    y = F.linear(h, fc2_weight, fc2_bias)
    if fc2_lora is not None:
        hd = fc2_lora.dropout(h) if fc2_lora.dropout is not None else h
        y = y + fc2_lora.scaling * F.linear(F.linear(hd, fc2_lora.a), fc2_lora.b)
    return y


def is_neuron_major(fc2_weight: torch.Tensor) -> bool:
    """True when fc2.weight (d_model, ffn) is stored column-major, i.e. its transpose is contiguous."""
    return fc2_weight.t().is_contiguous()


def neuron_major(fc2_weight: torch.Tensor) -> torch.Tensor:
    """fc2.weight laid out column-major: itself if it already is, else a (differentiable) copy. For weights the
    caller does not own, e.g. the ones FSDP gathers into its own buffers for each forward."""
    return fc2_weight if is_neuron_major(fc2_weight) else fc2_weight.t().contiguous().t()


def neuron_major_(fc2_weight: torch.Tensor) -> torch.Tensor:
    """Re-lay fc2.weight's storage column-major, in place; same object, shape and dtype. Returns it.

    Done once at patch time: afterwards each neuron block of fc2 (a column block of the (d_model, ffn)
    weight) is one contiguous run of block_size * d_model elements. Parameters keep their identity, so
    optimizers and LoRA wrappers holding them stay valid; gradients come back with the same strides.
    """
    if not is_neuron_major(fc2_weight):
        with torch.no_grad():
            fc2_weight.data = fc2_weight.data.t().contiguous().t()
    return fc2_weight


def _low_rank_inputs(x2: torch.Tensor, fc1_lora: LowRank | None, fc2_lora: LowRank | None):
    u = b1 = a2 = None
    if fc1_lora is not None:
        xd = fc1_lora.dropout(x2) if fc1_lora.dropout is not None else x2
        u = F.linear(xd, fc1_lora.a) * fc1_lora.scaling
        b1 = fc1_lora.b
    if fc2_lora is not None:
        if fc2_lora.dropout is not None:
            raise ValueError("fc2_lora.dropout: dropout on fc2's LoRA input is not supported by the neuron-block op")
        a2 = fc2_lora.a
    return u, b1, a2


def neuron_block_mlp(
    x: torch.Tensor,
    active_block_ids: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    *,
    block_size: int,
    n_active: torch.Tensor | None = None,
    fc1_lora: LowRank | None = None,
    fc2_lora: LowRank | None = None,
    check_indices: bool | None = None,
) -> torch.Tensor:
    """The neuron-block MLP through the Triton kernels; same math and arguments as the reference.

    Args:
        x: (..., d_model), fp16/bf16/fp32 (fp32 accumulation throughout).
        active_block_ids: (capacity,) int32 on x's device, increasing; the first `n_active` are used.
            A fixed capacity (e.g. all blocks) with a device-side `n_active` means nothing recompiles
            or syncs when the count changes.
        n_active: (1,) int32 device tensor, or None (all `capacity` ids are active).
        fc1_weight, fc1_bias, fc2_weight, fc2_bias: nn.Linear layouts; fc2_weight is fastest after
            `neuron_major_`. Gradients flow to whichever of them require grad; frozen ones get none.
        block_size: 16, 32, 64 or 128.
        fc1_lora, fc2_lora: LoRA adapters (see the module docstring).
        check_indices: check index values on the host (a sync on GPU); None: only for CPU tensors.

    Returns:
        (..., d_model).
    """
    if _kernels is None:
        raise RuntimeError("neuron_block_mlp needs Triton, which is not importable here")
    check_active_set(active_block_ids, n_active, x)
    lead, d_model = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d_model)
    u, b1lr, a2 = _low_rank_inputs(x2, fc1_lora, fc2_lora)
    if torch.compiler.is_compiling():
        check_indices = False  # reading index values would be a host sync inside the graph
    _kernels.check_inputs(x2, active_block_ids, n_active, fc1_weight, fc1_bias, fc2_weight, fc2_bias, block_size,
                          u, b1lr, a2, check_indices=check_indices)
    if n_active is None:
        n_active = torch.full((1,), active_block_ids.numel(), dtype=torch.int32, device=x.device)
    y, _, v, _ = torch.ops.longexposure.neuron_block_mlp(x2, active_block_ids, n_active, fc1_weight, fc1_bias,
                                                         fc2_weight, fc2_bias, block_size, u, b1lr, a2)
    if fc2_lora is not None:
        y = y + F.linear(v, fc2_lora.b) * fc2_lora.scaling
    return y.reshape(*lead, d_model)


# ---------------------------------------------------------------------------------------------------
# torch.library registration: the operator's one autograd path, eager and under torch.compile alike.
# Its eager dispatch costs host time (see longexposure.ops.block_sparse_attention) that compiled and
# CUDA-graph steps do not pay.
# ---------------------------------------------------------------------------------------------------

if _kernels is not None:
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.library import triton_op, wrap_triton

    class _ShapesOnly:
        """`kernel[grid](...)` that launches nothing: an interpreted kernel given fake tensors."""

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    def _wrap(x: torch.Tensor) -> _kernels.Wrap:
        """How the launchers reach the kernels for this call.

        Real tensors (eager): directly, so the launchers keep their cached-config fast path and TMA.
        Traced tensors: through wrap_triton, so Inductor sees the kernels. Under TRITON_INTERPRET=1 a
        kernel cannot be traced: fake tensors only propagate shapes (dynamo's graph still calls the op,
        which then runs the kernels eagerly) and functional ones are refused (AOTAutograd would drop
        the kernels from the graph).
        """
        if type(x) is torch.Tensor:  # the common eager case, without is_fake's checks
            return _kernels._no_wrap
        functional = isinstance(x, FunctionalTensor)
        if not functional and not is_fake(x):
            return _kernels._no_wrap
        if not _kernels.INTERPRET:
            return wrap_triton
        if functional:
            raise RuntimeError(
                "neuron_block_mlp: AOTAutograd cannot trace Triton interpreter kernels; under "
                "TRITON_INTERPRET=1 compile with backend='eager', or run on a GPU"
            )
        return _ShapesOnly

    @triton_op("longexposure::neuron_block_mlp", mutates_args=())
    def _neuron_block_mlp_op(
        x: torch.Tensor,
        active_block_ids: torch.Tensor,
        n_active: torch.Tensor,
        fc1_weight: torch.Tensor,
        fc1_bias: torch.Tensor | None,
        fc2_weight: torch.Tensor,
        fc2_bias: torch.Tensor | None,
        block_size: int,
        fc1_lr_x: torch.Tensor | None,
        fc1_lr_weight: torch.Tensor | None,
        fc2_lr_weight: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y, h, v, bits): see kernels.neuron_block_mlp.neuron_block_mlp_forward."""
        return _kernels.neuron_block_mlp_forward(
            x, active_block_ids, n_active, fc1_weight, fc1_bias, fc2_weight, fc2_bias, block_size,
            fc1_lr_x, fc1_lr_weight, fc2_lr_weight, wrap=_wrap(x),
        )

    def _setup_context(ctx, inputs, output):
        x, ids, n_active, w1, _b1, w2, _b2, block_size, u, b1lr, a2 = inputs
        n = ctx.needs_input_grad
        # Saved only for the gradients that read them: x for fc1's weight, h for fc2's weight and LoRA A. The
        # ReLU's backward reads the bits, so a frozen MLP keeps 1/16 of h (and not x) per layer for the backward.
        ctx.save_for_backward(x if n[3] else None, output[1] if n[5] or n[10] else None, output[3], ids, n_active,
                              w1, w2, u, b1lr, a2)
        ctx.block_size = block_size
        ctx.x_shape = x.shape
        ctx.set_materialize_grads(False)  # an unused v (or y) costs no zero-filled gradient

    def _backward(ctx, dy, _dh, dv, _dbits):
        # The launchers directly, not a second custom op: AOTAutograd would decompose that op into the same
        # kernel calls, and in eager its dispatch was pure host overhead (~15 us per backward on a CPU).
        x, h, bits, ids, n_active, w1, w2, u, b1lr, a2 = ctx.saved_tensors
        n = ctx.needs_input_grad
        if dy is None:
            dy = w1.new_zeros(ctx.x_shape)
        g = _kernels.neuron_block_mlp_backward(dy, dv, x, h, bits, ids, n_active, w1, w2, ctx.block_size, u, b1lr,
                                               a2, (n[0], n[3], n[4], n[5], n[6], n[8], n[9], n[10]), wrap=_wrap(dy))
        return g[0], None, None, g[1], g[2], g[3], g[4], None, g[5], g[6], g[7]

    torch.library.register_autograd("longexposure::neuron_block_mlp", _backward, setup_context=_setup_context)
