"""Training losses (registry `training_loss`): how a step turns a batch into the language-modelling loss.

    model            the model's own forward with labels: logits over the vocabulary, then the Hugging Face
                     loss on them (compiled with the layers when `compile` is on: Inductor upcasts inside its
                     reductions, so no float32 logits exist, but the bf16 / fp16 logits and their gradient do).
    fused-linear-ce  the decoder's last hidden states, then the output projection and cross-entropy one chunk
                     of tokens at a time: the (tokens x vocabulary) logits never exist, and each chunk's
                     gradient is computed in the forward (two matmuls per chunk, as the unfused forward +
                     backward take; nothing is recomputed).

Why our own: Liger-Kernel's `LigerFusedLinearCrossEntropyLoss` (0.8.5) reads the count of non-ignored
tokens on the host (`.item()` in `fused_linear_cross_entropy_forward`), which a CUDA graph cannot capture;
here the count stays on the device and scales the gradients in the backward. On a GPU each chunk is one
Inductor program (the matmuls on cuBLAS, the softmax, one-hot and scaling fused around them).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longexposure.registry import TRAINING_LOSSES

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024  # logits of 1024 tokens x 50272 (OPT's vocabulary) in fp32: 206 MB at a time


def _chunk_grads(h: Tensor, weight: Tensor, labels: Tensor, want_weight: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """One chunk: (summed loss over its non-ignored tokens, d loss_sum / d h, d loss_sum / d weight or None)."""
    logits = (h @ weight.T).float()  # (n, V)
    valid = labels != IGNORE_INDEX
    target = torch.where(valid, labels, 0)
    lse = torch.logsumexp(logits, -1)
    picked = logits.gather(1, target[:, None])[:, 0]
    loss_sum = torch.where(valid, lse - picked, 0.0).sum()
    dlogits = torch.exp(logits - lse[:, None])  # softmax
    dlogits = dlogits.scatter_add(1, target[:, None], -torch.ones_like(lse)[:, None])
    dlogits = (dlogits * valid[:, None]).to(h.dtype)
    dweight = dlogits.T @ h if want_weight else None
    return loss_sum, dlogits @ weight, dweight


@functools.cache
def _compiled_chunk() -> Any:
    return torch.compile(_chunk_grads, dynamic=False)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over non-ignored tokens of CE(h W^T, labels), gradients made in the forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        run = _compiled_chunk() if hidden.is_cuda else _chunk_grads
        want_weight = weight.requires_grad
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        for start in range(0, hidden.shape[0], chunk):
            part = slice(start, start + chunk)
            loss_sum, dh, dw = run(hidden[part], weight, labels[part], want_weight)
            total = total + loss_sum
            if grad_hidden is not None:
                grad_hidden[part] = dh
            if grad_weight is not None:
                grad_weight += dw.float()
        count = (labels != IGNORE_INDEX).sum().clamp_min(1).float()  # on the device: no host read
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_out.float() / count  # in fp32: a loss scale of 2**16 over one token would overflow fp16
        dh = None if grad_hidden is None else (grad_hidden.float() * scale).to(grad_hidden.dtype)
        dw = None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype)
        return dh, dw, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = CHUNK_TOKENS) -> Tensor:
    """Mean cross-entropy of `hidden` (N, H) @ `weight` (V, H)^T against `labels` (N,) (IGNORE_INDEX skipped),
    without the (N, V) logits: at most `chunk` tokens' logits exist at a time."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_cross_entropy: hidden (N, H), weight (V, H), labels (N,); got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(labels.shape)}"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return _LinearCrossEntropy.apply(hidden, weight.to(hidden.dtype), labels, chunk)


@TRAINING_LOSSES.register("model", help="the model's forward with labels: logits, then the Hugging Face loss")
def model_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    return model(**batch, use_cache=False).loss


@TRAINING_LOSSES.register(
    "fused-linear-ce", help="decoder hidden states, then output projection + cross-entropy in chunks (no logits)"
)
def fused_linear_ce_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The causal-LM loss of `batch` (input_ids, labels, optional attention_mask) through the decoder and
    `linear_cross_entropy`: the same value as `model_loss` (labels shifted by one, -100 ignored)."""
    from longexposure.arch import base_model

    base = base_model(model)
    head = base.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None or getattr(base.config, "final_logit_softcapping", None):
        raise ValueError(
            f"fused-linear-ce needs a bias-free output projection and plain logits ({type(base).__name__})"
        )
    peft_config = getattr(model, "peft_config", None)
    if peft_config and any(getattr(c, "is_prompt_learning", False) for c in peft_config.values()):
        raise ValueError("fused-linear-ce calls the decoder directly; prompt-learning methods (p-tuning) need the "
                         "PEFT model's forward: use training_loss 'model'")  # fmt: skip
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = base.base_model(**inputs, use_cache=False).last_hidden_state  # (B, S, H)
    labels = batch["labels"]
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    with torch.autocast(h.device.type, enabled=False):
        return linear_cross_entropy(h.to(dtype), head.weight, labels[:, 1:].reshape(-1))


def reference_loss(hidden: Tensor, weight: Tensor, labels: Tensor) -> Tensor:
    """`linear_cross_entropy` with the logits materialized (tests)."""
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE_INDEX)
