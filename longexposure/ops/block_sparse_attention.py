"""Block-sparse attention: the pure-torch reference, and the functional wrapper around the kernels.

`reference_attention` is dense math on the masked score matrix (runs anywhere, no Triton); the
optimized path never imports it. `block_sparse_attention` calls the Triton kernels through
a `torch.library.triton_op` whose registered autograd formula is the operator's only one, eager and
under `torch.compile` alike (there the kernels appear to Inductor as user-defined Triton kernels). In
eager the op's dispatch costs host time a plain autograd.Function would not (about 30 us per forward
with grad on a CPU, most of it torch re-reading the op schema per call: pytorch/pytorch#195110); a
compiled or CUDA-graph step does not pay it.

Semantics of the reference and the op (B = batch, H = heads, S = sequence, D = head dim):
    q, k, v        (B, H, S, D); the layout's batch/head dims may be 1 (broadcast).
    causal         query i sees key j only if j <= i (top-left aligned, training without a cache).
    seq_lens       optional (B,) int32 valid lengths (right padding): keys >= seq_lens[b] are
                   masked; query rows >= seq_lens[b] produce 0 and get zero gradient.
    scale          softmax scale, default 1/sqrt(D).
A query row with no visible key produces 0.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from longexposure.attention.layout import BlockLayout


def check_layout_arg(layout: object) -> None:
    """TypeError naming the argument for a non-layout (raw tables, a mask), not an AttributeError later.

    The layout's values were checked where it was built (see `BlockLayout`); here only metadata is."""
    if not isinstance(layout, BlockLayout):
        raise TypeError(
            f"layout: expected a BlockLayout (e.g. BlockLayout.from_dense(mask, block)), got {type(layout).__name__}"
        )


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout | None,
    *,
    causal: bool = True,
    seq_lens: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Materialised masked-softmax attention in q's dtype (softmax in fp32, or fp64 for fp64 inputs).

    Masked scores are pushed to the dtype's minimum, and the probabilities are multiplied by the mask
    afterwards, so fully masked rows are 0 and every gradient is finite and masked.
    """
    bsz, heads, seq, dim = q.shape
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    qi = torch.arange(seq, device=q.device)[:, None]
    kj = torch.arange(seq, device=q.device)[None, :]
    if layout is not None:
        check_layout_arg(layout)
        layout.check_compatible(bsz, heads, seq, seq)
        mask = layout.token_mask(seq, causal=causal, seq_lens=seq_lens)
    else:
        mask = torch.ones(1, 1, seq, seq, dtype=torch.bool, device=q.device)
        if causal:
            mask = mask & (kj <= qi)
        if seq_lens is not None:
            lens = seq_lens.long().view(-1, 1, 1, 1)
            mask = mask & (kj < lens) & (qi < lens)
    soft_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = (q @ k.transpose(-1, -2)).to(soft_dtype) * scale
    scores = scores.masked_fill(~mask, torch.finfo(soft_dtype).min)
    probs = torch.softmax(scores, dim=-1) * mask
    return (probs.to(v.dtype) @ v).to(q.dtype)


# ------------------------------------------------------------------- the custom op and its autograd


@functools.cache
def _ops() -> object:
    """Define the custom op and its autograd (once, at import when Triton is installed)."""
    from torch.library import register_autograd, triton_op

    from longexposure.kernels import block_sparse_attention as kernels

    @triton_op("longexposure::block_sparse_attn_fwd", mutates_args={})
    def fwd(
        q: Tensor,
        k: Tensor,
        v: Tensor,
        kv_counts: Tensor,
        kv_indices: Tensor,
        q_counts: Tensor | None,
        q_indices: Tensor | None,
        seq_lens: Tensor | None,
        block: int,
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor]:
        # q_counts/q_indices are unused here; they ride along so the backward can save them
        return kernels.block_sparse_attention_fwd(
            q, k, v, kv_counts, kv_indices, seq_lens, block=block, causal=causal, scale=scale
        )

    def setup_context(ctx, inputs, output):  # type: ignore[no-untyped-def]
        q, k, v, kv_counts, kv_indices, q_counts, q_indices, seq_lens, block, causal, scale = inputs
        o, lse = output
        ctx.save_for_backward(q, k, v, o, lse, kv_counts, kv_indices, q_counts, q_indices, seq_lens)
        ctx.meta = (block, causal, scale)

    def backward(ctx, do, dlse):  # type: ignore[no-untyped-def]
        q, k, v, o, lse, kv_counts, kv_indices, q_counts, q_indices, seq_lens = ctx.saved_tensors
        if q_counts is None or q_indices is None:
            raise RuntimeError(
                "block-sparse attention backward needs the transposed layout (q_counts, q_indices): "
                "call layout.with_transpose()"
            )
        block, causal, scale = ctx.meta
        # The launcher directly, not a second custom op: AOTAutograd would decompose that op into the same
        # kernel calls (the launcher wraps them when traced), and in eager its dispatch was pure host overhead.
        # dO arrives as a transposed view of the (B, S, H, D) output gradient: the kernels take its strides, so
        # copying it to (B, H, S, D) would only add a 16 MiB copy a layer (fig7's step profile, 77ef17a)
        do = do if do.stride(-1) == 1 else do.contiguous()
        dq, dk, dv = kernels.block_sparse_attention_bwd(
            do, q, k, v, o, lse, kv_counts, kv_indices, q_counts, q_indices, seq_lens,
            block=block, causal=causal, scale=scale,
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None

    register_autograd("longexposure::block_sparse_attn_fwd", backward, setup_context=setup_context)
    return fwd


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout,
    *,
    causal: bool = True,
    seq_lens: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Fused block-sparse attention (Triton): O (B, H, S, D) visiting only the layout's blocks.

    Needs CUDA, or the Triton interpreter (TRITON_INTERPRET=1 set before import) on CPU. When any of
    q, k, v requires grad, the layout's transpose is built on the device if missing (no host sync).
    The layout's tensors go in as tensors of fixed shape, so new layouts never recompile.
    """
    bsz, heads, seq, dim = q.shape
    check_layout_arg(layout)
    layout.check_compatible(bsz, heads, seq, k.shape[2])
    if k.shape[2] != seq:
        raise ValueError(f"block-sparse attention needs q_len == k_len, got {seq} and {k.shape[2]}")
    if seq_lens is not None:
        seq_lens = seq_lens.to(device=q.device, dtype=torch.int32)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        layout = layout.with_transpose()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if not _HAVE_TRITON:
        raise RuntimeError("block_sparse_attention needs Triton; reference_attention runs without it")
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    args = (
        layout.kv_counts, layout.kv_indices, layout.q_counts, layout.q_indices, seq_lens, layout.block, causal, scale
    )
    o, _ = torch.ops.longexposure.block_sparse_attn_fwd(q, k, v, *args)
    return o


try:  # register the ops at import (outside any torch.compile trace); the reference needs no Triton
    import triton  # noqa: F401
except ImportError:
    _HAVE_TRITON = False
else:
    _HAVE_TRITON = True
    _ops()
