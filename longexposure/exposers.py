"""Shadowy-sparsity exposers (paper Sec. IV): which blocks of attention and MLP are worth computing.

Each policy is a small strategy class with an eager reference; the registry name shows up in tables.
Policies see the true quantities (attention probabilities, ReLU outputs) and so are the targets the
predictors learn and the upper bound they are measured against.

MLP policies take the ReLU output `act` of one layer, (..., ffn) (any leading batch/sequence dims,
all reduced: one neuron-block set serves the whole batch, as the operator runs it), and return the
operator's format: a sorted int32 tensor of active neuron-block ids (`block_mask` gives the boolean
(n_blocks,) form). Blocks are `block_size` consecutive neurons, so `ffn % block_size == 0`.

    dense       every block.
    shadowy     every neuron active for any token of the sequence (unstructured: block_size 1 by
                default; with block_size > 1, every block holding such a neuron).
    threshold   block importance = alpha * count / max(count) + (1 - alpha) * mass / max(mass), with
                count = number of (token, neuron) activations in the block over the sequence and mass
                = their sum; blocks with importance < theta * peak importance are dropped. theta is
                the knob of Fig. 9.

Attention policies take the block attention mass `mass` (B, H, N, N): the mean over the queries of
query block i of the softmax probability that falls on key block j (rows sum to 1; see
`attention_block_mass`), or `q, k` through `__call__`. They return a causal boolean block mask
(B, H, N, N) (j <= i only); uniform policies broadcast it over batch and heads.

    dense         every causal block.
    shadowy       one mask for all heads and the batch: every block whose mass is >= eps in any
                  (batch, head).
    longformer    causal local window of `window_blocks` blocks + the first `global_blocks` key blocks, all
                  heads (the mask recipe `mask_policies.LongformerMask`, shared with the mask policy).
    bigbird       window + global + `random_blocks` seeded random causal blocks per query row, all heads
                  (`mask_policies.BigBirdMask`).
    long-exposure head-specific: per (batch, head) and query block, the fewest key blocks that keep
                  >= tau of that row's mass; then snapped (`snap=True`) to the cheapest combination
                  of atomic patterns (`AtomSet`: causal window W, global G, optional stride S) whose
                  union still keeps >= tau of every row's mass, so the operator's pattern pool can
                  run it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from longexposure.mask_policies import AtomSet, BigBirdMask, DenseMask, LongformerMask, atom_mask
from longexposure.registry import EXPOSERS


class ExposerError(ValueError):
    """Bad input to an exposer (shape, divisibility, parameters); the message says what and why."""


# ================================================================================================ MLP
def block_stats(act: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Per neuron block, over every leading (batch, sequence) position: activation count and mass.

    Args:
        act: (..., ffn) ReLU outputs (>= 0).
        block_size: neurons per block; must divide ffn.

    Returns:
        count (n_blocks,) float32: number of (position, neuron) pairs with act > 0 in the block.
        mass (n_blocks,) float32: sum of act over the block.
    """
    if act.dim() < 1:
        raise ExposerError("act must have a last (ffn) dimension")
    ffn = act.shape[-1]
    if block_size < 1 or ffn % block_size:
        raise ExposerError(f"ffn dim {ffn} is not divisible by block_size {block_size}")
    flat = act.reshape(-1, ffn // block_size, block_size).float()
    count = (flat > 0).sum(dim=(0, 2), dtype=torch.float32)
    mass = flat.clamp_min(0).sum(dim=(0, 2))
    return count, mass


def block_importance(count: Tensor, mass: Tensor, alpha: float) -> Tensor:
    """alpha * count / max(count) + (1 - alpha) * mass / max(mass), per block (the threshold policy's score)."""
    c = count / count.max().clamp_min(1e-12)
    m = mass / mass.max().clamp_min(1e-12)
    return alpha * c + (1.0 - alpha) * m


def ids_from_mask(mask: Tensor) -> Tensor:
    """Boolean (n_blocks,) -> sorted int32 ids (the operator's active-block format; synchronizes)."""
    return mask.nonzero().flatten().to(torch.int32)


def ids_with_count(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Boolean (n_blocks,) -> fixed-capacity (ids (n_blocks,) int32, count () int32), without a host sync.

    The first `count` ids are the active blocks in increasing order; the rest are 0 (padding). The
    operator takes this pair as `(active_block_ids, n_active)`.
    """
    n = mask.shape[-1]
    ar = torch.arange(n, device=mask.device)
    ordered = torch.sort(torch.where(mask, ar, ar + n), dim=-1).values
    return torch.where(ordered < n, ordered, 0).to(torch.int32), mask.sum(-1, dtype=torch.int32)


class MlpExposer:
    """Base of MLP policies: `block_mask(act)` -> (n_blocks,) bool; calling returns the int32 ids."""

    target = "mlp"
    block_size: int = 64

    def block_mask(self, act: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def mask_from_stats(self, count: Tensor, mass: Tensor) -> Tensor:
        """The same decision from per-block (count, mass) sums (how predictors reuse the policy)."""
        raise NotImplementedError(f"{type(self).__name__} decides from neurons, not block sums")

    def __call__(self, act: Tensor) -> Tensor:
        return ids_from_mask(self.block_mask(act))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


@EXPOSERS.register("dense", target="both", help="every block (MLP) / every causal block (attention)")
def dense(target: str = "mlp", **kwargs: object) -> MlpExposer | AttentionExposer:
    """`dense` exists for both targets: `EXPOSERS.get('dense')(target='attention')`."""
    if target == "mlp":
        return DenseMlp(**kwargs)  # type: ignore[arg-type]
    if target == "attention":
        return DenseAttention(**kwargs)  # type: ignore[arg-type]
    raise ExposerError(f"target must be 'mlp' or 'attention', got {target!r}")


@dataclass(repr=False)
class DenseMlp(MlpExposer):
    block_size: int = 64

    def block_mask(self, act: Tensor) -> Tensor:
        count, _ = block_stats(act, self.block_size)
        return torch.ones_like(count, dtype=torch.bool)

    def mask_from_stats(self, count: Tensor, mass: Tensor) -> Tensor:
        return torch.ones_like(count, dtype=torch.bool)


@dataclass(repr=False)
class ShadowyMlp(MlpExposer):
    """Union over the sequence: a block (a neuron when block_size=1) is kept if anything in it fires."""

    block_size: int = 1

    def block_mask(self, act: Tensor) -> Tensor:
        count, _ = block_stats(act, self.block_size)
        return count > 0

    def mask_from_stats(self, count: Tensor, mass: Tensor) -> Tensor:
        return count > 0


@dataclass(repr=False)
class ThresholdMlp(MlpExposer):
    """Block-wise filter: drop blocks whose importance is under theta x the peak block's.

    Args:
        block_size: neurons per block.
        theta: relative threshold in [0, 1]; 0 keeps every block with any activation.
        alpha: weight of the activation count vs. the activation mass in the importance.
        min_blocks: always keep at least this many (the most important) blocks.
    """

    block_size: int = 64
    theta: float = 0.1
    alpha: float = 0.5
    min_blocks: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.theta <= 1.0:
            raise ExposerError(f"theta must be in [0, 1], got {self.theta}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ExposerError(f"alpha must be in [0, 1], got {self.alpha}")

    def mask_from_stats(self, count: Tensor, mass: Tensor, theta: Tensor | float | None = None) -> Tensor:
        """`theta` overrides the policy's (a 0-d device tensor: a threshold that can change under a CUDA graph)."""
        imp = block_importance(count, mass, self.alpha)
        keep = (imp >= (self.theta if theta is None else theta) * imp.max()) & (count > 0)
        k = min(self.min_blocks, imp.numel())
        if k > 0:
            keep.index_fill_(0, imp.topk(k).indices, True)  # a scalar fill: no host tensor (graph capture)
        return keep

    def block_mask(self, act: Tensor) -> Tensor:
        return self.mask_from_stats(*block_stats(act, self.block_size))


EXPOSERS.register(
    "threshold", ThresholdMlp, target="mlp", help="block importance from count and mass; drop < theta x peak"
)


def mlp_mass_kept(act: Tensor, mask: Tensor, block_size: int) -> float:
    """Fraction of the activation mass (sum of ReLU outputs) inside the kept blocks."""
    _, mass = block_stats(act, block_size)
    return float(mass[mask].sum() / mass.sum().clamp_min(1e-12))


# ========================================================================================== attention
def attention_block_mass(q: Tensor, k: Tensor, block: int, *, causal: bool = True, head_chunk: int = 8) -> Tensor:
    """Block attention mass: mean over the queries of block i of the softmax mass on key block j.

    Args:
        q, k: (B, H, S, D) queries and keys (before the 1/sqrt(D) scaling); S % block == 0.
        block: tokens per block.
        causal: mask keys after the query (top-left aligned).
        head_chunk: heads processed at once (bounds the (S, S) memory).

    Returns:
        (B, H, N, N) float32 with N = S / block; each row sums to 1 (0 above the diagonal if causal).
    """
    if q.dim() != 4 or q.shape != k.shape:
        raise ExposerError(f"q and k must both be (B, H, S, D), got {tuple(q.shape)} and {tuple(k.shape)}")
    bsz, heads, seq, dim = q.shape
    if block < 1 or seq % block:
        raise ExposerError(f"sequence length {seq} is not divisible by the attention block size {block}")
    n = seq // block
    out = torch.empty(bsz, heads, n, n, dtype=torch.float32, device=q.device)
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril() if causal else None
    for h0 in range(0, heads, head_chunk):
        qs, ks = q[:, h0 : h0 + head_chunk].float(), k[:, h0 : h0 + head_chunk].float()
        scores = qs @ ks.transpose(-1, -2) / math.sqrt(dim)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(-1)  # (B, h, S, S)
        hc = probs.shape[1]
        out[:, h0 : h0 + hc] = probs.view(bsz, hc, n, block, n, block).sum(-1).mean(-2)
    return out


def causal_blocks(n: int, device: torch.device | str = "cpu") -> Tensor:
    """(n, n) boolean lower triangle (key block j <= query block i)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


def attention_mass_kept(mass: Tensor, mask: Tensor) -> Tensor:
    """Per (batch, head): mean over query blocks of the row mass inside the mask, (B, H)."""
    return (mass * mask).sum(-1).mean(-1)


def attention_density(mask: Tensor) -> Tensor:
    """Per (batch, head): kept blocks / causal blocks, (B, H) (dense = 1)."""
    n = mask.shape[-1]
    return mask.sum((-1, -2)).float() / (n * (n + 1) / 2)


class AttentionExposer:
    """Base of attention policies: `block_mask(mass)` -> (B, H, N, N) causal bool; call with (q, k)."""

    target = "attention"
    block: int = 64

    def block_mask(self, mass: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, q: Tensor, k: Tensor) -> Tensor:
        return self.block_mask(attention_block_mass(q, k, self.block))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


def _check_mass(mass: Tensor) -> tuple[int, int, int]:
    if mass.dim() != 4 or mass.shape[-1] != mass.shape[-2]:
        raise ExposerError(f"block mass must be (B, H, N, N), got {tuple(mass.shape)}")
    return mass.shape[0], mass.shape[1], mass.shape[-1]


@dataclass(frozen=True)
class UniformAttention(AttentionExposer):
    """Base of the exposers built from a mask recipe (`mask_policies`): the recipe's mask for every (batch, head);
    `block` (tokens per block) is what the exposer adds to the recipe's fields."""

    block: int = 64

    def block_mask(self, mass: Tensor) -> Tensor:
        b, h, n = _check_mass(mass)
        return self.reference(n, mass.device).expand(b, h, n, n)


@dataclass(repr=False)
class ShadowyAttention(AttentionExposer):
    """One uniform mask covering every block with mass >= eps in any batch element or head."""

    block: int = 64
    eps: float = 0.01

    def block_mask(self, mass: Tensor) -> Tensor:
        b, h, n = _check_mass(mass)
        uni = (mass >= self.eps).any(0).any(0) | torch.eye(n, dtype=torch.bool, device=mass.device)
        return (uni & causal_blocks(n, mass.device)).expand(b, h, n, n)


# --------------------------------------------------------------------------------------------- atoms
@functools.lru_cache(maxsize=64)
def _candidates(n: int, strides: tuple[int, ...], device: str) -> tuple[tuple[AtomSet, ...], Tensor, Tensor]:
    """Every (window, global[, stride]) AtomSet for n blocks, their masks (K, N, N) and block counts (K,)."""
    specs = tuple(AtomSet(w, g, s) for s in (0, *strides) for g in range(0, n + 1) for w in range(1, n + 1))
    masks = torch.stack([atom_mask(s, n) for s in specs]).to(device)
    cost = masks.sum((-1, -2)).float() + torch.arange(len(specs), device=device) * 1e-6  # ties: first listed
    return specs, masks, cost


@torch.compiler.assume_constant_result
def _candidate_masks(n: int, strides: tuple[int, ...], device: str) -> Tensor:
    """`_candidates`' masks; under torch.compile a constant on `device`, not a CPU build copied in per call."""
    return _candidates(n, strides, device)[1]


@torch.compiler.assume_constant_result
def _candidate_cost(n: int, strides: tuple[int, ...], device: str) -> Tensor:
    """`_candidates`' costs, a compile-time constant like `_candidate_masks`."""
    return _candidates(n, strides, device)[2]


def snap_to_atoms(
    mass: Tensor, required: Tensor, tau: float, *, strides: tuple[int, ...] = ()
) -> tuple[Tensor, Tensor]:
    """Per (batch, head), the cheapest `AtomSet` (window, global[, stride]) keeping >= tau of every row.

    A row whose own head-specific mask `required` keeps less than tau (cannot happen for exact
    masses; can for predicted ones) asks only for what `required` keeps. Window = N always qualifies.
    No host synchronization (the choice stays on the device; `atoms_of` turns it into AtomSets).

    Args:
        mass: (B, H, N, N) block mass (rows sum to 1).
        required: (B, H, N, N) bool, the head-specific blocks.
        tau: mass to keep per query-block row.
        strides: stride atoms to consider besides none.

    Returns:
        mask (B, H, N, N) bool, and choice (B, H) int64 indexing `candidate_atoms(N, strides)`.
    """
    b, h, n = _check_mass(mass)
    key = (n, tuple(strides), str(mass.device))
    cands, cost = _candidate_masks(*key), _candidate_cost(*key)
    need = torch.minimum((mass * required).sum(-1), torch.full_like(mass[..., 0], tau)) - 1e-5  # (B, H, N)
    kept = torch.einsum("kij,bhij->bhki", cands.to(mass.dtype), mass)  # (B, H, K, N)
    ok = (kept >= need[:, :, None, :]).all(-1)  # (B, H, K)
    choice = torch.where(ok, cost, torch.full_like(cost, float("inf"))).argmin(-1)  # (B, H)
    return cands[choice], choice


def candidate_atoms(n: int, strides: tuple[int, ...] = ()) -> tuple[AtomSet, ...]:
    """The AtomSets `snap_to_atoms` chooses among, in the order its `choice` indexes."""
    return _candidates(n, tuple(strides), "cpu")[0]


def atoms_of(choice: Tensor, n: int, strides: tuple[int, ...] = ()) -> list[list[AtomSet]]:
    """The chosen AtomSet per (batch, head) of a `snap_to_atoms` choice (synchronizes)."""
    specs = candidate_atoms(n, strides)
    return [[specs[int(c)] for c in row] for row in choice.cpu()]


def pool_selection(chosen: list[list[AtomSet]], pool_atoms: list[str]) -> Tensor:
    """The (B, H, A) boolean atom selection a pattern pool over `pool_atoms` combines.

    Raises if a chosen atom is not in the pool (the pool must list every local-W / global-G used).
    """
    index = {name: a for a, name in enumerate(pool_atoms)}
    sel = torch.zeros(len(chosen), len(chosen[0]), len(pool_atoms), dtype=torch.bool)
    for bi, row in enumerate(chosen):
        for hi, spec in enumerate(row):
            for name in spec.names():
                if name not in index:
                    raise ExposerError(f"atom {name!r} is not in the pattern pool {pool_atoms}")
                sel[bi, hi, index[name]] = True
    return sel


def head_specific_mask(mass: Tensor, tau: float) -> Tensor:
    """Per (batch, head) and query block: the fewest key blocks whose mass reaches tau of the row's."""
    _check_mass(mass)
    vals, order = mass.sort(-1, descending=True)
    before = vals.cumsum(-1) - vals  # mass of the blocks ranked above
    total = vals.sum(-1, keepdim=True)
    take = before < tau * total - 1e-7  # keep a block while the ones above it are still short of tau
    take[..., 0].fill_(True)  # (not `= True`: that copies a host tensor, which CUDA-graph capture refuses)
    mask = torch.zeros_like(take).scatter(-1, order, take)
    n = mass.shape[-1]
    return mask & causal_blocks(n, mass.device)


@dataclass(frozen=True)
class DenseAttention(DenseMask, UniformAttention):
    """The `dense` mask recipe: every causal block."""


@dataclass(frozen=True)
class LongformerAttention(LongformerMask, UniformAttention):
    """The `longformer` mask recipe (`mask_policies.LongformerMask`: its fields and defaults) as an exposer."""


@dataclass(frozen=True)
class BigBirdAttention(BigBirdMask, UniformAttention):
    """The `bigbird` mask recipe (`mask_policies.BigBirdMask`: its fields and defaults) as an exposer."""


@dataclass(repr=False)
class LongExposureAttention(AttentionExposer):
    """Head-specific masks keeping >= tau of each query block's mass, snapped to atoms (see module doc)."""

    block: int = 64
    tau: float = 0.95
    snap: bool = True
    strides: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise ExposerError(f"tau must be in (0, 1], got {self.tau}")
        self.last_choice: Tensor | None = None
        self.last_n = 0

    def block_mask(self, mass: Tensor) -> Tensor:
        raw = head_specific_mask(mass, self.tau)
        self.last_n = mass.shape[-1]
        if not self.snap:
            return raw
        mask, self.last_choice = snap_to_atoms(mass, raw, self.tau, strides=tuple(self.strides))
        return mask

    def atoms(self) -> list[list[AtomSet]]:
        """The AtomSet chosen per (batch, head) by the last `block_mask` call."""
        if self.last_choice is None:
            raise ExposerError("no mask computed yet")
        return atoms_of(self.last_choice, self.last_n, tuple(self.strides))

    def __repr__(self) -> str:
        return f"LongExposureAttention(block={self.block}, tau={self.tau}, snap={self.snap}, strides={self.strides})"


@EXPOSERS.register(
    "shadowy", target="both", help="MLP: neurons active for any token; attention: one mask covering all heads"
)
def shadowy(target: str = "mlp", **kwargs: object) -> MlpExposer | AttentionExposer:
    """`shadowy` exists for both targets: `EXPOSERS.get('shadowy')(target='attention')`."""
    if target == "mlp":
        return ShadowyMlp(**kwargs)  # type: ignore[arg-type]
    if target == "attention":
        return ShadowyAttention(**kwargs)  # type: ignore[arg-type]
    raise ExposerError(f"target must be 'mlp' or 'attention', got {target!r}")


EXPOSERS.register("longformer", LongformerAttention, target="attention", help="local window + global blocks")
EXPOSERS.register("bigbird", BigBirdAttention, target="attention", help="window + global + seeded random blocks")
EXPOSERS.register(
    "long-exposure", LongExposureAttention, target="attention", help="head-specific tau-mass masks snapped to atoms"
)

MLP_POLICIES = ("dense", "shadowy", "threshold")
ATTENTION_POLICIES = ("dense", "shadowy", "longformer", "bigbird", "long-exposure")


def make_exposer(name: str, target: str, **params: object) -> MlpExposer | AttentionExposer:
    """Build a policy by name for `target` ('mlp' or 'attention'); `shadowy` and `dense` exist for both.

    Unknown names raise the registry's error (with the valid names); a policy that does not serve the
    target says which targets it serves.
    """
    if target not in ("mlp", "attention"):
        raise ExposerError(f"target must be 'mlp' or 'attention', got {target!r}")
    entry = EXPOSERS.entry(name)
    if entry.meta.get("target") == "both":
        params = {"target": target, **params}
    if entry.meta.get("target") not in (target, "both"):
        valid = MLP_POLICIES if target == "mlp" else ATTENTION_POLICIES
        raise ExposerError(f"exposer {name!r} serves {entry.meta.get('target')}, not {target}; {target}: {valid}")
    try:
        return entry.obj(**params)
    except TypeError as exc:
        raise ExposerError(f"exposer {name!r}: {exc}") from None
