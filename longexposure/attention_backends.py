"""Attention backends (registry `attention_backend`) and the `long_exposure` transformers integration.

Every backend computes the same function (see `longexposure.ops.block_sparse_attention`):

    backend(q, k, v, layout=None, *, causal=True, seq_lens=None, scale=None) -> O    # (B, H, S, D)

    eager   materialised scores, mask, softmax (the paper's baseline; = the reference)
    sdpa    F.scaled_dot_product_attention: dense flash with is_causal when there is no layout and
            no padding; otherwise the layout as a dense token mask (correct, but computes every block)
    flex    FlexAttention with a BlockMask built directly from the layout's index tensors (full blocks
            split from the diagonal/padding blocks that need mask_mod); static shapes, so a new
            layout never recompiles. CUDA: forward + backward. CPU: forward only (torch has no
            FlexAttention backward on CPU; asking for one raises BackendUnavailable).
    triton  the fused block-sparse kernel (`kernels/block_sparse_attention.py`); CUDA, or CPU under
            the Triton interpreter (TRITON_INTERPRET=1 set before the kernels are imported).

Capabilities are registry metadata (`devices`, `dtypes`, `supports_backward`, `sparse`); a requested
backend that cannot run here raises `BackendUnavailable` saying why, and is never replaced by another.

transformers integration
------------------------
`register_transformers_attention()` registers `long_exposure` with transformers' `AttentionInterface`
(and its mask function with `AttentionMaskInterface`: the 2-D padding mask, read on the device),
after which `AutoModelForCausalLM.from_pretrained(..., attn_implementation="long_exposure")` routes
every attention layer to `long_exposure_attention_forward`. That function finds, in this order:

1. the kwarg `block_layout` passed through the model's forward (`model(ids, block_layout=...)`):
   a `BlockLayout` for every layer, a `{layer_idx: BlockLayout}` dict, or a callable
   `fn(module) -> BlockLayout | None`;
2. the module's `SparseAttentionSlot` (attribute `long_exposure_slot`), set per layer per step by the
   model-patching code with `set_layout(module, layout, backend=...)`;
3. otherwise the dense causal layout (no sparsity; the same kernel, not a different backend).

The slot also names the backend (`triton` by default, or `flex`/`eager`/`sdpa`) and records
`last_backend` and `last_layout_source` after each call, so a run can state what actually ran.
Layouts are (B or 1, H or 1, NQ, NK) with NQ = ceil(S / block); the block is the layout's. Right
padding comes from the 2-D attention mask (left padding raises); q_len must equal kv_len
(training/prefill; generation with a KV cache should load with `sdpa`). GQA models get their KV heads
repeated before the kernel. Attention dropout is not supported (raises when the module trains with
dropout > 0).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from longexposure.attention.layout import BlockLayout
from longexposure.backends import BackendUnavailable, why_triton_cannot_run
from longexposure.registry import ATTENTION_BACKENDS

_FLOATS = ("float16", "bfloat16", "float32")


class AttentionBackend:
    """Base: `check` raises BackendUnavailable; `__call__` runs attention. Subclasses set `name`."""

    name = "?"
    dtypes: tuple[str, ...] = _FLOATS

    def check(self, device: torch.device, dtype: torch.dtype, needs_grad: bool) -> None:
        if str(dtype).removeprefix("torch.") not in self.dtypes:
            raise BackendUnavailable(
                f"attention backend {self.name!r} does not support {dtype}; it supports {self.dtypes}"
            )

    def __call__(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        layout: BlockLayout | None = None,
        *,
        causal: bool = True,
        seq_lens: Tensor | None = None,
        scale: float | None = None,
    ) -> Tensor:
        raise NotImplementedError

    def _prepare(self, q: Tensor, k: Tensor, v: Tensor, layout: BlockLayout | None) -> None:
        self.check(q.device, q.dtype, torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
        if layout is not None:
            if not isinstance(layout, BlockLayout):  # not an AttributeError below
                raise TypeError(f"layout: expected a BlockLayout or None, got {type(layout).__name__}")
            layout.check_compatible(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _row_guard(mask: Tensor) -> tuple[Tensor, Tensor]:
    """(mask with fully masked rows opened, rows-with-any-key) so softmax stays finite."""
    live = mask.any(-1, keepdim=True)
    return mask | ~live, live


@ATTENTION_BACKENDS.register(
    "eager", devices=("cuda", "cpu"), dtypes=("float16", "bfloat16", "float32", "float64"), supports_backward=True,
    sparse=False, help="materialised scores + mask + softmax (paper baseline)",
)
class EagerAttention(AttentionBackend):
    name = "eager"
    dtypes = (*_FLOATS, "float64")

    def __call__(self, q, k, v, layout=None, *, causal=True, seq_lens=None, scale=None):
        self._prepare(q, k, v, layout)
        from longexposure.ops.block_sparse_attention import reference_attention

        return reference_attention(q, k, v, layout, causal=causal, seq_lens=seq_lens, scale=scale)


@ATTENTION_BACKENDS.register(
    "sdpa", devices=("cuda", "cpu"), dtypes=_FLOATS + ("float64",), supports_backward=True, sparse=False,
    help="dense F.scaled_dot_product_attention (flash when causal without mask); layouts as token masks",
)
class SdpaAttention(AttentionBackend):
    name = "sdpa"
    dtypes = (*_FLOATS, "float64")

    def __call__(self, q, k, v, layout=None, *, causal=True, seq_lens=None, scale=None):
        self._prepare(q, k, v, layout)
        if layout is None and seq_lens is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        seq = q.shape[2]
        if layout is not None:
            mask = layout.token_mask(seq, k.shape[2], causal=causal, seq_lens=seq_lens)
        else:
            qi = torch.arange(seq, device=q.device)[:, None]
            kj = torch.arange(k.shape[2], device=q.device)[None, :]
            mask = torch.ones(1, 1, seq, k.shape[2], dtype=torch.bool, device=q.device)
            if causal:
                mask = mask & (kj <= qi)
            lens = seq_lens.to(q.device).long().view(-1, 1, 1, 1)  # type: ignore[union-attr]
            mask = mask & (kj < lens) & (qi < lens)
        mask, live = _row_guard(mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale) * live


# ---------------------------------------------------------------------------------------------- flex


def _flex_split(layout: BlockLayout, causal: bool, seq_lens: Tensor | None, batch: int):
    """(partial kv/q tables, full kv/q tables) for a BlockMask; device-side, no sync.

    A listed block is *partial* (needs mask_mod) if it is the causal diagonal or its keys cross the
    valid length; the rest are *full*. Lists stay sorted (compaction keeps order).
    """
    block = layout.block
    lens = None
    if seq_lens is not None:
        layout = layout.expand(batch, layout.heads)
        lens = seq_lens.to(layout.device).long().view(-1, 1, 1, 1)

    def split(counts: Tensor, idx: Tensor, rows_are_q: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n = idx.shape[-1]
        pos = torch.arange(n, device=idx.device)
        row = torch.arange(idx.shape[-2], device=idx.device)[:, None]
        ent = idx.long()
        valid = (pos < counts[..., None]) & (ent >= 0) & (ent < n)  # an unchecked layout's stray entries: dropped
        kb, qb = (ent, row) if rows_are_q else (row, ent)
        partial = (kb >= qb) if causal else torch.zeros_like(valid)
        if lens is not None:
            partial = partial | ((kb + 1) * block > lens)
        out = []
        for keep in (valid & partial, valid & ~partial):
            order = torch.sort(torch.where(keep, pos, pos + n), dim=-1).values
            got = torch.gather(idx, -1, order % n)
            take = order < n
            out += [keep.sum(-1, dtype=torch.int32), torch.where(take, got, 0).to(torch.int32).contiguous()]
        return out[0], out[1], out[2], out[3]

    layout = layout.with_transpose()
    kv = split(layout.kv_counts, layout.kv_indices, rows_are_q=True)
    qq = split(layout.q_counts, layout.q_indices, rows_are_q=False)  # type: ignore[arg-type]
    return kv, qq


def _causal_mod(b, h, q_idx, kv_idx):  # noqa: ANN001 - FlexAttention mask_mod signature
    return q_idx >= kv_idx


def _all_mod(b, h, q_idx, kv_idx):  # noqa: ANN001
    return q_idx >= 0


@functools.cache
def _compiled_flex() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


_FLEX_BWD_TILE: list[int] = []  # layout blocks < 128 seen by the flex backend; tiles fit the smallest


def _fit_flex_bwd_tiles(block: int) -> None:
    """Let FlexAttention's backward run on layouts of `block` < 128 tokens on CUDA.

    Inductor's default Hopper backward tile for head_dim 64..128 is 64x128, which does not divide a
    64-token block, and Inductor drops such configs before kernel_options apply; this adds the same
    configs with tiles shrunk to the block. It only appends choices, so other compiled code is unaffected.
    The class is made module-level (name and qualname) so Inductor's cache can pickle it.
    """
    if _FLEX_BWD_TILE:
        if block not in _FLEX_BWD_TILE:
            _FLEX_BWD_TILE.append(block)
        return
    import contextlib
    import dataclasses

    from torch._inductor import config as inductor_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    def get_flex_attention_bwd_configs(self, head_dim, dtype, device_type="cuda"):  # noqa: ANN001
        confs = list(InductorChoices.get_flex_attention_bwd_configs(self, head_dim, dtype, device_type))
        b = min(*_FLEX_BWD_TILE, 64)
        extra = []
        for c in confs:
            with contextlib.suppress(TypeError, ValueError):  # another torch's config type: leave it alone
                extra.append(dataclasses.replace(c, block_m1=min(c.block_m1, b), block_n1=b, block_m2=b,
                                                 block_n2=min(c.block_n2, b)))
        return confs + [e for e in extra if e not in confs]

    cls = type("_FittedFlexChoices", (InductorChoices,),
               {"get_flex_attention_bwd_configs": get_flex_attention_bwd_configs, "__module__": __name__})
    globals()["_FittedFlexChoices"] = cls
    _FLEX_BWD_TILE.append(block)
    inductor_config.inductor_choices_class = cls
    V.set_choices_handler(cls())


@ATTENTION_BACKENDS.register(
    "flex", devices=("cuda", "cpu"), backward_devices=("cuda",), dtypes=_FLOATS, supports_backward=True, sparse=True,
    help="torch FlexAttention with a BlockMask from the layout (compiled, static shapes)",
)
class FlexAttentionBackend(AttentionBackend):
    name = "flex"

    def check(self, device, dtype, needs_grad):
        super().check(device, dtype, needs_grad)
        if device.type == "cpu" and needs_grad:
            raise BackendUnavailable(
                "attention backend 'flex' runs forward only on CPU (torch has no FlexAttention backward on CPU); "
                "use a CUDA device, or the 'triton' backend under TRITON_INTERPRET=1"
            )
        if device.type not in ("cuda", "cpu"):
            raise BackendUnavailable(f"attention backend 'flex' does not run on {device.type}")

    def block_mask(self, layout: BlockLayout, seq: int, batch: int, *, causal: bool, seq_lens: Tensor | None):
        """The BlockMask for this layout: index tensors passed straight through (no dense mask)."""
        from torch.nn.attention.flex_attention import BlockMask

        (p_kc, p_ki, f_kc, f_ki), (p_qc, p_qi, f_qc, f_qi) = _flex_split(layout, causal, seq_lens, batch)
        if seq_lens is None:
            mod = _causal_mod if causal else _all_mod
        else:
            lens = seq_lens.to(layout.device)

            def mod(b, h, q_idx, kv_idx):  # noqa: ANN001
                ok = kv_idx < lens[b]
                return ok & (q_idx >= kv_idx) if causal else ok

        return BlockMask(
            seq_lengths=(seq, seq), kv_num_blocks=p_kc, kv_indices=p_ki, full_kv_num_blocks=f_kc, full_kv_indices=f_ki,
            q_num_blocks=p_qc, q_indices=p_qi, full_q_num_blocks=f_qc, full_q_indices=f_qi,
            BLOCK_SIZE=(layout.block, layout.block), mask_mod=mod,
        )

    def __call__(self, q, k, v, layout=None, *, causal=True, seq_lens=None, scale=None):
        self._prepare(q, k, v, layout)
        bsz, heads, seq, _ = q.shape
        if layout is None:
            layout = dense_layout(seq, q.device, causal=causal)
        bm = self.block_mask(layout, seq, bsz, causal=causal, seq_lens=seq_lens)
        options = None
        if q.device.type == "cuda" and layout.block < 128:
            options = {"BLOCK_M": layout.block, "BLOCK_N": min(layout.block, 64)}
            _fit_flex_bwd_tiles(layout.block)
        out = _compiled_flex()(q, k, v, block_mask=bm, scale=scale, kernel_options=options)
        if seq_lens is not None:
            live = torch.arange(seq, device=q.device)[None, None, :, None] < seq_lens.to(q.device).view(-1, 1, 1, 1)
            out = out * live
        return out


# -------------------------------------------------------------------------------------------- triton


@ATTENTION_BACKENDS.register(
    "triton", devices=("cuda", "cpu-interpret"), dtypes=_FLOATS, supports_backward=True, sparse=True,
    help="fused block-sparse flash attention (Triton), forward + backward over the layout",
)
class TritonBlockSparseAttention(AttentionBackend):
    name = "triton"

    def check(self, device, dtype, needs_grad):
        super().check(device, dtype, needs_grad)
        why = why_triton_cannot_run(device)
        if why:
            raise BackendUnavailable(f"attention backend 'triton' cannot run here: {why}")

    def __call__(self, q, k, v, layout=None, *, causal=True, seq_lens=None, scale=None):
        self._prepare(q, k, v, layout)
        from longexposure.ops.block_sparse_attention import block_sparse_attention

        if layout is None:
            layout = dense_layout(q.shape[2], q.device, causal=causal)
        return block_sparse_attention(q, k, v, layout, causal=causal, seq_lens=seq_lens, scale=scale)


DEFAULT_BLOCK = 64


def dense_layout(seq: int, device: torch.device | str, *, causal: bool = True, block: int | None = None) -> BlockLayout:
    """The layout listing every (causal) block: sparse backends with it compute ordinary attention."""
    from longexposure.mask_policies import mask_layout

    block = block or (DEFAULT_BLOCK if seq >= DEFAULT_BLOCK else 16)
    return mask_layout("dense", 1, 1, seq, block, causal=causal, device=device)


@functools.cache
def get_backend(name: str) -> AttentionBackend:
    """The (shared, stateless) instance of a registered backend; unknown names list the valid ones."""
    return ATTENTION_BACKENDS.get(name)()


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: BlockLayout | None = None,
    *,
    backend: str = "triton",
    causal: bool = True,
    seq_lens: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Run one named backend (no fallback)."""
    return get_backend(backend)(q, k, v, layout, causal=causal, seq_lens=seq_lens, scale=scale)


# ------------------------------------------------------------------------------ transformers adapter

SLOT_ATTR = "long_exposure_slot"
HF_NAME = "long_exposure"


@dataclass
class SparseAttentionSlot:
    """Per-attention-module state read by `long_exposure_attention_forward`.

    Attributes:
        layout: the layout for this layer's next call(s); None = dense causal.
        backend: registered backend name that runs it.
        last_backend, last_layout_source: what the last call actually used (for result records).
    """

    layout: BlockLayout | None = None
    backend: str = "triton"
    last_backend: str | None = None
    last_layout_source: str | None = None


def set_layout(
    module: torch.nn.Module, layout: BlockLayout | None, *, backend: str | None = None
) -> SparseAttentionSlot:
    """Attach (or update) the slot on an attention module; cheap enough to call every step."""
    slot = getattr(module, SLOT_ATTR, None)
    if slot is None:
        slot = SparseAttentionSlot()
        setattr(module, SLOT_ATTR, slot)
    slot.layout = layout
    if backend is not None:
        ATTENTION_BACKENDS.entry(backend)  # unknown names fail here, not mid-forward
        slot.backend = backend
    return slot


def _resolve_layout(module: torch.nn.Module, given: Any) -> tuple[BlockLayout | None, str]:
    if given is not None:
        if isinstance(given, BlockLayout):
            return given, "kwarg"
        if isinstance(given, dict):
            return given.get(getattr(module, "layer_idx", None)), "kwarg-dict"
        if callable(given):
            return given(module), "kwarg-callable"
        raise TypeError(f"block_layout must be a BlockLayout, a dict by layer_idx or a callable, got {type(given)}")
    slot = getattr(module, SLOT_ATTR, None)
    if slot is not None and slot.layout is not None:
        return slot.layout, "slot"
    return None, "dense-default"


def _lens_from_mask(attention_mask: Tensor | None, kv_len: int) -> Tensor | None:
    """Valid lengths from a 2-D right-padding mask; left padding fails a device-side assert (no sync)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"long_exposure attention takes the 2-D padding mask (B, kv_len), got shape {tuple(attention_mask.shape)}; "
            "custom 4-D masks are not supported (express the pattern as a BlockLayout)"
        )
    m = attention_mask[:, -kv_len:].bool()
    lens = m.sum(-1, dtype=torch.int32)
    right = (torch.arange(kv_len, device=m.device)[None, :] < lens[:, None]) == m
    torch._assert_async(right.all(), "long_exposure attention supports right padding only")
    return lens


def long_exposure_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers attention function: (B, H, S, D) inputs -> ((B, S, H, D) output, None)."""
    if dropout and module.training:
        raise NotImplementedError("long_exposure attention has no attention dropout; set attention_dropout=0")
    if query.shape[2] != key.shape[2]:
        raise NotImplementedError(
            f"long_exposure attention needs q_len == kv_len (training/prefill), got {query.shape[2]} and "
            f"{key.shape[2]}; "
            "load the model with attn_implementation='sdpa' for generation"
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    layout, source = _resolve_layout(module, kwargs.get("block_layout"))
    slot = getattr(module, SLOT_ATTR, None)
    backend = kwargs.get("attention_backend") or (slot.backend if slot is not None else "triton")
    causal = bool(getattr(module, "is_causal", True))
    seq_lens = _lens_from_mask(attention_mask, key.shape[2])
    if layout is None:
        layout = dense_layout(query.shape[2], query.device, causal=causal)
    out = attention(query, key, value, layout, backend=backend, causal=causal, seq_lens=seq_lens, scale=scaling)
    if slot is not None:
        slot.last_backend, slot.last_layout_source = backend, source
    return out.transpose(1, 2).contiguous(), None


def padding_mask_for_long_exposure(
    batch_size: int, q_length: int, kv_length: int, *args: Any, attention_mask: Tensor | None = None, **kwargs: Any
) -> Tensor | None:
    """transformers mask function: the 2-D padding mask, sliced to kv_length, passed on as it is.

    transformers' flash-attention mask function asks `attention_mask.all()` on the host to drop an all-ones
    mask; that sync breaks CUDA-graph capture, and `_lens_from_mask` reads the mask on the device anyway."""
    return None if attention_mask is None else attention_mask[:, -kv_length:]


def register_transformers_attention(name: str = HF_NAME) -> str:
    """Register `long_exposure_attention_forward` (+ its 2-D padding mask) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(name, long_exposure_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, padding_mask_for_long_exposure)
    return name


__all__ = [
    "AttentionBackend",
    "SparseAttentionSlot",
    "attention",
    "dense_layout",
    "get_backend",
    "long_exposure_attention_forward",
    "register_transformers_attention",
    "set_layout",
]
