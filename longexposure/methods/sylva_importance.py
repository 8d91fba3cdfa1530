"""Sylva's weight importance (paper eqs. 18-20) and the per-layer block mask.

For one linear layer with mean gradient Gamma (out, in) (torch's weight layout), input factor A (in)
and output-gradient factor G (out):

    input dimension j  (eq. 19):  s_in[j]  = g_j^T G g_j / [A^-1]_jj,   g_j = Gamma[:, j]
    output dimension k (eq. 20):  s_out[k] = g_k^T A g_k / [G^-1]_kk,   g_k = Gamma[k, :]

(eq. 18 solved with a Lagrange multiplier under H ~ A (x) G). The weight importance is their outer
product Omega[k, j] = s_out[k] s_in[j]; a block's importance is the sum over its b x b entries, which
for an outer product is (block-sum of s_out) x (block-sum of s_in), so Omega is never materialised.
Each layer keeps its top (1 - sigma) fraction of blocks (at least one).
"""

from __future__ import annotations

import math

import torch


def importance_scores(grad: torch.Tensor, a_factor, g_factor, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 19-20 for every input and output dimension of one layer.

    Args:
        grad: (out, in) mean weight gradient Gamma.
        a_factor, g_factor: factors with `matmul` and `inverse_diagonal` (see `sylva_kfac`).
        damping: Tikhonov damping relative to each factor's mean diagonal.
    Returns:
        (s_in (in,), s_out (out,)) in fp32.
    """
    g = grad.float()
    num_in = (g * g_factor.matmul(g)).sum(0)  # g_j^T G g_j for every column j
    num_out = (g * a_factor.matmul(g.t()).t()).sum(1)  # g_k^T A g_k for every row k
    s_in = num_in / a_factor.inverse_diagonal(damping).to(num_in)
    s_out = num_out / g_factor.inverse_diagonal(damping).to(num_out)
    return s_in, s_out


def weight_importance(s_in: torch.Tensor, s_out: torch.Tensor) -> torch.Tensor:
    """Omega (out, in) = outer(s_out, s_in) (for tests and small layers)."""
    return torch.outer(s_out, s_in)


def _block_sums(v: torch.Tensor, block: int) -> torch.Tensor:
    n = math.ceil(v.numel() / block) * block
    return torch.nn.functional.pad(v, (0, n - v.numel())).view(-1, block).sum(1)


def block_importance(s_in: torch.Tensor, s_out: torch.Tensor, block: int) -> torch.Tensor:
    """Sum of Omega over each b x b block: (ceil(out/b), ceil(in/b)), ragged edge blocks included."""
    return torch.outer(_block_sums(s_out, block), _block_sums(s_in, block))


def keep_count(n_blocks: int, sparsity: float) -> int:
    """How many of `n_blocks` a layer keeps at sparsity sigma: round((1 - sigma) n), at least 1."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    return max(1, min(n_blocks, round((1.0 - sparsity) * n_blocks)))


def top_block_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean block mask keeping the `keep_count` highest-scoring blocks (ties broken by position)."""
    k = keep_count(scores.numel(), sparsity)
    idx = torch.topk(scores.flatten().float(), k, sorted=False).indices
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[idx] = True
    return mask.view_as(scores)


def random_block_mask(shape: tuple[int, int], block: int, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random block mask at the same density (latency/memory runs, where the choice is immaterial)."""
    nbr, nbc = math.ceil(shape[0] / block), math.ceil(shape[1] / block)
    scores = torch.rand(nbr, nbc, generator=generator)
    return top_block_mask(scores, sparsity)
