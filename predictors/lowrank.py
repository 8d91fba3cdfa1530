"""Sequence-oriented predictors (paper Sec. V): per-token stage, then a reduction over batch and sequence.

Every predictor takes the tensor its operator is about to read, x (B, S, d): fc1's input for the MLP,
q_proj's input for attention, and returns the operator's format:
    MLP        sorted int32 active neuron-block ids (one set for the whole batch);
    attention  a causal boolean block mask (B, H, N, N), N = S / attn_block (with `reduce_batch`,
               one mask per head broadcast over the batch, as the paper reduces over the batch).

How the reduction works (the same decision rule as the exposer the predictor imitates):
    MLP        stage 1, per token t: predicted per-block activation count c_hat[t, b] (fraction of the
               block's neurons that fire) and mass m_hat[t, b]; stage 2: sum over batch and sequence,
               then the `threshold` policy's rule on the sums (importance = alpha * count / peak +
               (1 - alpha) * mass / peak >= theta * slack x peak). A sum over thousands of tokens
               averages per-token errors out, which is why a small per-token model suffices.
    attention  x is mean-pooled over each block of attn_block tokens (N = S / block positions; N =
               sqrt(S) at the paper's S = 1024, block 64), per head q_hat = x_pool W_Q, k_hat =
               x_pool W_K (rank r), block logits q_hat k_hat^T / sqrt(r) + log(keys in block), a
               causal softmax over key blocks -> predicted block mass; averaged over the batch; then
               the `long-exposure` rule: per head the fewest blocks keeping >= tau (+ tau_slack) of
               each row's predicted mass, snapped to atoms.

Predictor models here; the registry entries are in `builtin.py`, offline training in `offline.py`, the online
refresh in `refresh.py`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longexposure.exposers import (
    ExposerError,
    LongExposureAttention,
    ThresholdMlp,
    head_specific_mask,
    ids_from_mask,
    ids_with_count,
    snap_to_atoms,
)


class PredictorError(ValueError):
    """Bad predictor input or configuration; the message says what was expected."""


@dataclass
class PredictorConfig:
    """What a predictor predicts and how it turns scores into the operator's format.

    Attributes:
        target: `mlp` or `attention`.
        block_size: MLP neurons per block (must divide ffn).
        attn_block: attention tokens per block (must divide the sequence length).
        rank: mlp-lowrank hidden rank (0: the paper's single d x n_blocks matrix); attn-lowrank rank
            per head; svd: the rank kept.
        theta, alpha: the `threshold` policy reproduced on predicted block sums.
        slack: theta multiplier (<= 1 keeps more blocks, raising recall); set by calibration.
        tau, snap, strides: the `long-exposure` policy reproduced on predicted block mass.
        tau_slack: added to tau for predicted masses (>= 0 raises recall); set by calibration.
        reduce_batch: attention: one mask per head for the whole batch (the paper's reduction).
        fixed_capacity: MLP: return (ids padded to n_blocks, count) without a host sync instead of
            the exact-length ids (the operator accepts both; see `exposers.ids_with_count`).
        density: `random`: fixed density; None matches the oracle's on every call.
        seed: `random`: generator seed; also the training seed.
    """

    target: str = "mlp"
    block_size: int = 64
    attn_block: int = 64
    rank: int = 128
    theta: float = 0.1
    alpha: float = 0.5
    slack: float = 1.0
    tau: float = 0.95
    snap: bool = True
    strides: tuple[int, ...] = ()
    tau_slack: float = 0.0
    reduce_batch: bool = True
    fixed_capacity: bool = False
    density: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in ("mlp", "attention"):
            raise PredictorError(f"target must be 'mlp' or 'attention', got {self.target!r}")
        if self.rank < 0:
            raise PredictorError(f"rank must be >= 0, got {self.rank}")
        self.strides = tuple(self.strides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["strides"] = list(self.strides)
        return d

    def exposer(self) -> ThresholdMlp | LongExposureAttention:
        """The exact policy this predictor imitates (its training target)."""
        if self.target == "mlp":
            return ThresholdMlp(block_size=self.block_size, theta=self.theta, alpha=self.alpha)
        return LongExposureAttention(block=self.attn_block, tau=self.tau, snap=self.snap, strides=self.strides)


def check_input(x: Tensor, d_model: int, *, block: int | None = None) -> tuple[int, int]:
    """x must be (B, S, d_model); with `block`, S % block == 0. Returns (B, S)."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise PredictorError(f"predictor input must be (batch, seq, hidden), got {getattr(x, 'shape', type(x))}")
    if x.shape[-1] != d_model:
        raise PredictorError(f"predictor input hidden size {x.shape[-1]} != the layer's hidden size {d_model}")
    if block is not None and x.shape[1] % block:
        raise PredictorError(f"sequence length {x.shape[1]} is not divisible by the attention block size {block}")
    return x.shape[0], x.shape[1]


# ================================================================================================ MLP
def _block_ids(mask: Tensor, config: PredictorConfig) -> Tensor | tuple[Tensor, Tensor]:
    """An MLP source's output: sorted int32 ids, or with `fixed_capacity` (ids, count) without a host sync."""
    return ids_with_count(mask) if config.fixed_capacity else ids_from_mask(mask)


class MlpPredictor(nn.Module):
    """Base: subclasses give per-token block (count fraction, mass); this class reduces and decides."""

    target = "mlp"

    def __init__(self, d_model: int, ffn: int, config: PredictorConfig):
        super().__init__()
        if ffn % config.block_size:
            raise PredictorError(f"ffn dim {ffn} is not divisible by block_size {config.block_size}")
        self.d_model, self.ffn, self.config = d_model, ffn, config
        self.n_blocks = ffn // config.block_size
        # config.slack as a device tensor: calibration (refresh) changes it in place, so a captured CUDA graph
        # or a compiled call (which lifts buffers to inputs) uses the new threshold without being rebuilt
        self.register_buffer("theta_scale", torch.tensor(float(config.slack)), persistent=False)

    def sync_config(self) -> None:
        """Copy `config.slack` into the threshold buffer (after calibration changed it)."""
        self.theta_scale.fill_(float(self.config.slack))

    def token_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """(count_frac, mass), each (B, S, n_blocks)."""
        raise NotImplementedError

    def block_sums(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Stage 2: the predicted per-block (count, mass) summed over batch and sequence, (n_blocks,) each."""
        check_input(x, self.d_model)
        frac, mass = self.token_stats(x)
        return frac.sum((0, 1)) * self.config.block_size, mass.sum((0, 1))

    def block_mask(self, x: Tensor) -> Tensor:
        policy = self.config.exposer()  # the exposer's theta, scaled by the calibrated slack below
        return policy.mask_from_stats(*self.block_sums(x), theta=policy.theta * self.theta_scale)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Sorted int32 ids of the predicted active neuron blocks (with `fixed_capacity`: (ids, count))."""
        mask = self.block_mask(x)
        return _block_ids(mask, self.config)


class MlpLowRank(MlpPredictor):
    """Per token: x -> [W_in (d x r) -> ReLU ->] W_A (r x 2 n_blocks) -> sigmoid count frac, softplus mass.

    rank 0 is the paper's single W_A (d x n_blocks) (here with two outputs per block). `mass_scale`
    (a buffer set from the training data) keeps the mass outputs O(1).
    """

    def __init__(self, d_model: int, ffn: int, config: PredictorConfig):
        super().__init__(d_model, ffn, config)
        r = config.rank
        self.inp = nn.Linear(d_model, r) if r > 0 else nn.Identity()
        self.out = nn.Linear(r if r > 0 else d_model, 2 * self.n_blocks)
        self.register_buffer("in_scale", torch.ones(()))
        self.register_buffer("mass_scale", torch.ones(()))

    def raw(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-token logits (count logit, mass pre-softplus), each (..., n_blocks).

        With rank > 0 the input scale is folded into W_in ((x / s) W^T = x (W / s)^T) and under autocast x enters
        the matmul as it is: the (tokens, d) input is read once, not cast to fp32, divided and cast back (in a
        bf16 graph step that round trip was half the predictor's time)."""
        w = self.out.weight
        if self.config.rank > 0:
            keep = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)  # (meta: no autocast)
            h = F.relu(F.linear(x if keep else x.to(w.dtype), self.inp.weight / self.in_scale, self.inp.bias))
        else:
            h = x.to(w.dtype) / self.in_scale
        o = self.out(h)
        return o[..., : self.n_blocks], o[..., self.n_blocks :]

    def token_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c, m = self.raw(x)
        return torch.sigmoid(c.float()), F.softplus(m.float()) * self.mass_scale


class MlpSvd(MlpPredictor):
    """Training-free: rank-r SVD of fc1, z_hat = x V_r S_r U_r^T + b1, then the block stats of relu(z_hat)."""

    def __init__(self, fc1_weight: Tensor, fc1_bias: Tensor | None, config: PredictorConfig):
        ffn, d = fc1_weight.shape
        super().__init__(d, ffn, config)
        r = min(config.rank or min(ffn, d), min(ffn, d))
        u, s, vh = torch.linalg.svd(fc1_weight.detach().float(), full_matrices=False)
        self.register_buffer("down", (vh[:r].T * s[:r]).contiguous().to(fc1_weight.dtype))  # (d, r)
        self.register_buffer("up", u[:, :r].T.contiguous().to(fc1_weight.dtype))  # (r, ffn)
        bias = fc1_bias.detach() if fc1_bias is not None else torch.zeros(ffn, dtype=fc1_weight.dtype)
        self.register_buffer("bias", bias.clone())

    def token_stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = F.relu((x.to(self.down.dtype) @ self.down) @ self.up + self.bias).float()
        z = z.view(*z.shape[:-1], self.n_blocks, self.config.block_size)
        return (z > 0).float().mean(-1), z.sum(-1)


# ========================================================================================== attention
@functools.lru_cache(maxsize=32)
def _diag_log_correction(n: int, block: int, device: str) -> Tensor:
    """log(number of visible keys) per (i, j) block: block off the diagonal, (block + 1) / 2 on it."""
    corr = torch.full((n, n), math.log(block), device=device)
    corr.diagonal().fill_(math.log((block + 1) / 2))
    return corr


class AttnPredictor(nn.Module):
    """Base: subclasses give block-pooled per-head (q_hat, k_hat); this class scores, reduces and decides."""

    target = "attention"

    def __init__(self, d_model: int, heads: int, config: PredictorConfig):
        super().__init__()
        self.d_model, self.heads, self.config = d_model, heads, config

    def pooled(self, x: Tensor) -> Tensor:
        """x (B, S, d) -> mean over each block of attn_block tokens, (B, N, d)."""
        b, s = check_input(x, self.d_model, block=self.config.attn_block)
        return x.view(b, s // self.config.attn_block, self.config.attn_block, self.d_model).mean(2)

    def qk(self, xp: Tensor) -> tuple[Tensor, Tensor, float]:  # pragma: no cover - abstract
        """(q_hat, k_hat) each (B, H, N, r), and the logit scale."""
        raise NotImplementedError

    def block_logits(self, x: Tensor) -> Tensor:
        """Causal log-mass logits over key blocks, (B, H, N, N) (-inf above the diagonal)."""
        q, k, scale = self.qk(self.pooled(x))
        n = q.shape[-2]
        logits = (q @ k.transpose(-1, -2)).float() * scale + _diag_log_correction(
            n, self.config.attn_block, str(q.device)
        )
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        return logits.masked_fill(~causal, float("-inf"))

    def block_mass(self, x: Tensor) -> Tensor:
        """Predicted block attention mass (B, H, N, N); rows sum to 1."""
        return self.block_logits(x).softmax(-1)

    def mask_from_mass(self, mass: Tensor) -> Tensor:
        cfg = self.config
        b = mass.shape[0]
        if cfg.reduce_batch:
            mass = mass.mean(0, keepdim=True)
        tau = min(1.0, cfg.tau + cfg.tau_slack)
        raw = head_specific_mask(mass, tau)
        mask = snap_to_atoms(mass, raw, tau, strides=cfg.strides)[0] if cfg.snap else raw
        return mask.expand(b, *mask.shape[1:])

    def forward(self, x: Tensor) -> Tensor:
        """Causal boolean block mask (B, H, N, N)."""
        return self.mask_from_mass(self.block_mass(x))


class AttnLowRank(AttnPredictor):
    """Trainable per-head W_Q_hat, W_K_hat (d x r, with biases) on the block-pooled input."""

    def __init__(self, d_model: int, heads: int, config: PredictorConfig):
        super().__init__(d_model, heads, config)
        r = config.rank or 16
        self.rank = r
        self.wq = nn.Linear(d_model, heads * r)
        self.wk = nn.Linear(d_model, heads * r)
        self.register_buffer("in_scale", torch.ones(()))

    def qk(self, xp: Tensor) -> tuple[Tensor, Tensor, float]:
        b, n, _ = xp.shape
        h = xp.to(self.wq.weight.dtype) / self.in_scale
        q = self.wq(h).view(b, n, self.heads, self.rank).transpose(1, 2)
        k = self.wk(h).view(b, n, self.heads, self.rank).transpose(1, 2)
        return q, k, 1.0 / math.sqrt(self.rank)


class AttnSvd(AttnPredictor):
    """Training-free: per head, a rank-r SVD of [W_Q | b_Q]^T [W_K | b_K] ((d+1) x (d+1)) on the pooled input."""

    def __init__(
        self,
        q_weight: Tensor,
        q_bias: Tensor | None,
        k_weight: Tensor,
        k_bias: Tensor | None,
        heads: int,
        config: PredictorConfig,
    ):
        d = q_weight.shape[1]
        super().__init__(d, heads, config)
        hd = q_weight.shape[0] // heads
        r = min(config.rank or hd, hd)
        self.rank = r
        zeros = torch.zeros(q_weight.shape[0], dtype=q_weight.dtype, device=q_weight.device)
        qa = torch.cat([q_weight, (q_bias if q_bias is not None else zeros)[:, None]], 1).float()  # (H*hd, d+1)
        ka = torch.cat([k_weight, (k_bias if k_bias is not None else zeros)[:, None]], 1).float()
        lefts, rights = [], []
        for h in range(heads):
            m = qa[h * hd : (h + 1) * hd].T @ ka[h * hd : (h + 1) * hd]  # (d+1, d+1)
            u, s, vh = torch.linalg.svd(m)
            lefts.append(u[:, :r] * s[:r].sqrt())
            rights.append(vh[:r].T * s[:r].sqrt())
        self.register_buffer("left", torch.stack(lefts).to(q_weight.dtype))  # (H, d+1, r)
        self.register_buffer("right", torch.stack(rights).to(q_weight.dtype))
        self.scale = 1.0 / math.sqrt(hd)

    def qk(self, xp: Tensor) -> tuple[Tensor, Tensor, float]:
        ones = torch.ones(*xp.shape[:-1], 1, dtype=self.left.dtype, device=xp.device)
        xa = torch.cat([xp.to(self.left.dtype), ones], -1)[:, None]  # (B, 1, N, d+1)
        return xa @ self.left, xa @ self.right, self.scale


# ============================================================================================ oracle
class MlpOracle(nn.Module):
    """The exposer's true pattern: relu(fc1(x)) through the `threshold` policy (recall 1 by definition).

    fc1 is the frozen base layer: the pattern of the pretrained weights, which is also what the trained
    predictors learn (a LoRA update on fc1 is not part of it)."""

    target = "mlp"

    def __init__(self, fc1: nn.Linear, act_fn: Any, config: PredictorConfig):
        super().__init__()
        self.fc1, self.act_fn, self.config = fc1, act_fn, config
        self.d_model, self.ffn = fc1.in_features, fc1.out_features
        if self.ffn % config.block_size:
            raise PredictorError(f"ffn dim {self.ffn} is not divisible by block_size {config.block_size}")

    def block_mask(self, x: Tensor) -> Tensor:
        check_input(x, self.d_model)
        # F.linear on the weights, not fc1's forward: an exposed model's fc1.forward runs the whole MLP
        z = F.linear(x.to(self.fc1.weight.dtype), self.fc1.weight, self.fc1.bias)
        return self.config.exposer().block_mask(self.act_fn(z))

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Sorted int32 active-block ids (with `fixed_capacity`: (ids, count), no host sync)."""
        mask = self.block_mask(x)
        return _block_ids(mask, self.config)


class AttnOracle(nn.Module):
    """The exposer's true pattern: exact q, k from the layer, block mass, `long-exposure` per (batch, head)."""

    target = "attention"

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, heads: int, config: PredictorConfig):
        super().__init__()
        self.q_proj, self.k_proj, self.heads, self.config = q_proj, k_proj, heads, config
        self.d_model = q_proj.in_features

    def block_mass(self, x: Tensor) -> Tensor:
        from longexposure.exposers import attention_block_mass

        b, s = check_input(x, self.d_model, block=self.config.attn_block)
        x = x.to(self.q_proj.weight.dtype)
        q = self.q_proj(x).view(b, s, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.heads, -1).transpose(1, 2)
        return attention_block_mass(q, k, self.config.attn_block)

    def forward(self, x: Tensor) -> Tensor:
        try:
            return self.config.exposer().block_mask(self.block_mass(x))
        except ExposerError as exc:
            raise PredictorError(str(exc)) from None


# ============================================================================================ random
def _random_mask(n_blocks: int, k: int, gen: torch.Generator, device: torch.device) -> Tensor:
    """(n_blocks,) bool with `k` blocks drawn on the host from `gen` (the random controls' draw)."""
    pick = torch.randperm(n_blocks, generator=gen)[:k].to(device)
    return torch.zeros(n_blocks, dtype=torch.bool, device=device).index_fill(0, pick, True)


class MlpRandom(nn.Module):
    """Random neuron blocks at a fixed density, or at the oracle's density on every call (Fig. 11 baseline)."""

    target = "mlp"

    def __init__(self, oracle: MlpOracle, config: PredictorConfig):
        super().__init__()
        self.oracle, self.config = oracle, config
        self.d_model = oracle.d_model
        self.n_blocks = oracle.ffn // config.block_size
        self.gen = torch.Generator().manual_seed(config.seed)

    def block_mask(self, x: Tensor) -> Tensor:
        check_input(x, self.d_model)
        if self.config.density is None:
            k = int(self.oracle.block_mask(x).sum())
        else:
            k = max(1, round(self.config.density * self.n_blocks))
        return _random_mask(self.n_blocks, k, self.gen, x.device)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        mask = self.block_mask(x)
        return _block_ids(mask, self.config)


class MlpRandomLike(nn.Module):
    """Random neuron blocks, as many as `predictor` keeps on the same input: the control at the predicted density
    (`MlpRandom` keeps as many as the exposer, which a recall-weighted predictor exceeds, e.g. 0.08 against 0.17
    on relu-base at theta 0.5). The count is read on the host: eager only, like `MlpRandom`."""

    target = "mlp"

    def __init__(self, predictor: MlpPredictor, seed: int = 0):
        super().__init__()
        self.predictor, self.config = predictor, predictor.config
        self.d_model, self.n_blocks = predictor.d_model, predictor.n_blocks
        self.gen = torch.Generator().manual_seed(seed)

    def block_mask(self, x: Tensor) -> Tensor:
        return _random_mask(self.n_blocks, int(self.predictor.block_mask(x).sum()), self.gen, x.device)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return _block_ids(self.block_mask(x), self.config)


class AttnRandom(nn.Module):
    """Per (batch, head): the diagonal plus random causal blocks, as many as the oracle keeps (or `density`)."""

    target = "attention"

    def __init__(self, oracle: AttnOracle, config: PredictorConfig):
        super().__init__()
        self.oracle, self.config = oracle, config
        self.d_model = oracle.d_model
        self.gen = torch.Generator().manual_seed(config.seed)

    def forward(self, x: Tensor) -> Tensor:
        b, s = check_input(x, self.d_model, block=self.config.attn_block)
        n = s // self.config.attn_block
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        if self.config.density is None:
            counts = self.oracle(x).sum((-1, -2)).cpu()  # (B, H)
        else:
            counts = torch.full((b, self.oracle.heads), max(n, round(self.config.density * n * (n + 1) / 2)))
        keys = torch.rand(b, self.oracle.heads, n, n, generator=self.gen).masked_fill(~causal, 3.0)
        keys = keys - 2.0 * torch.eye(n)  # the diagonal first: every query block sees itself
        rank = keys.flatten(-2).argsort(-1).argsort(-1).view(b, -1, n, n)
        return ((rank < counts[..., None, None]) & causal).to(x.device)
