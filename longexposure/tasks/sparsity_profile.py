"""Task `sparsity-profile`: per-layer density and mass kept of every exposer policy (Fig. 9 left, Fig. 4).

One case is one (policy, layer) of one model on one data set. The model runs once per setup (the
captures are cached for the next cases); neurons are reordered first when `reorder` is set, with the
permutation computed on `profile_batches` batches that are *not* the measured ones.

Policies are written `target/name[:key=value,...]`, e.g. `mlp/threshold:theta=0.1`,
`attention/long-exposure:tau=0.95,snap=false`; `mlp/per-token`, `mlp/per-sequence` and
`mlp/per-batch` give the Fig. 4 contrast (density = fraction of neurons active per token / over a
sequence / over the batch).

With `time_backend` (Fig. 9 right, the per-layer time of each policy), the case also times that
operator on the layer's real inputs of the first measured batch with exactly the pattern the policy
chose for it: an MLP backend (`dense`, `torch-gather`, `triton`; `mlp/shadowy:block_size=1` through
`torch-gather` is the unstructured case) on fc1's captured input and the layer's weights, or an
attention backend on the captured q, k (v is random: time does not depend on its values) with the
policy's layout (`sdpa` and `eager` as a token mask; the `dense` policy as plain causal attention, flash
for sdpa). Forward and forward + backward are timed; `bwd_ms` is their difference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import yaml

from longexposure.exposers import attention_block_mass
from longexposure.profiling import PolicySpec, attention_row, capture, mlp_row, per_token_vs_sequence
from longexposure.registry import TASKS
from longexposure.suite.context import RunContext

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FIG4 = {"per-token": "per_token_sparsity", "per-sequence": "per_sequence_sparsity", "per-batch": "per_batch_sparsity"}


def parse_policy(text: str) -> PolicySpec | str:
    """`target/name[:k=v,...]` -> PolicySpec, or the Fig. 4 key for `mlp/per-*`."""
    target, sep, rest = text.partition("/")
    if not sep or target not in ("mlp", "attention"):
        raise ValueError(f"policy {text!r}: expected 'mlp/NAME[:k=v,...]' or 'attention/NAME[:k=v,...]'")
    name, _, opts = rest.partition(":")
    if target == "mlp" and name in FIG4:
        return name
    params: dict[str, Any] = {}
    for pair in filter(None, opts.split(",")):
        key, eq, value = pair.partition("=")
        if not eq:
            raise ValueError(f"policy {text!r}: option {pair!r} is not key=value")
        params[key] = yaml.safe_load(value)
    return PolicySpec(name, target, params, label=text)


@dataclass
class SparsityProfileCase:
    model: str = field(default="relu-micro", metadata={"help": "preset name or local HF checkpoint directory"})
    weights: str | None = field(
        default=None,
        metadata={"help": "checkpoint; None: the pretrained cache for relu-* presets; 'random-init': random weights"},
    )
    pretrain: bool = field(default=False, metadata={"help": "pretrain a missing relu-* checkpoint first"})
    dataset: str = field(default="e2e", metadata={"help": "dataset name (e2e, alpaca, ...)"})
    data_path: str | None = field(default=None, metadata={"help": "dataset path; None: shared/data/e2e"})
    batch: int = 4
    seq_len: int = 256
    batches: int = field(default=2, metadata={"help": "measured batches"})
    profile_batches: int = field(default=4, metadata={"help": "batches the neuron permutation is computed on"})
    reorder: bool = field(default=True, metadata={"help": "reorder neurons by profiled activation mass first"})
    mlp_block: int = 64
    attn_block: int = 64
    policy: str = "mlp/threshold:theta=0.1"
    layer: int = 0
    time_backend: str | None = field(
        default=None, metadata={"help": "also time this mlp_backend / attention_backend with the policy's pattern"}
    )
    dtype: str = field(default="float16", metadata={"help": "timing dtype: float16, bfloat16 or float32"})
    warmup: int = 3
    reps: int = 10

    def __post_init__(self) -> None:
        spec = parse_policy(self.policy)
        if self.time_backend is not None and isinstance(spec, str):
            raise ValueError(f"policy {self.policy!r} is a Fig. 4 statistic, not a pattern an operator can run")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {sorted(_DTYPES)}")
        if self.seq_len % self.attn_block:
            raise ValueError(f"seq_len {self.seq_len} is not divisible by attn_block {self.attn_block}")
        if self.batches < 1 or self.profile_batches < 0:
            raise ValueError("need batches >= 1 and profile_batches >= 0")


_CACHE: dict[str, Any] = {}


def resolve_weights(model: str, weights: str | None, pretrain: bool) -> tuple[str, str | None]:
    """(model, weights) for build_model, and a description: pretrained cache, explicit path or random init."""
    from longexposure.paths import cache_dir
    from longexposure.pretrain import RECIPES, checkpoint_for

    if weights == "random-init":
        return model, None
    if weights is None and model in RECIPES:
        try:
            return model, str(checkpoint_for(model))
        except FileNotFoundError:
            if not pretrain:
                raise
            from longexposure.pretrain import pretrain as run_pretrain

            return model, str(run_pretrain(model, out=cache_dir() / model))
    return model, weights


def _setup(case: SparsityProfileCase, ctx: RunContext) -> dict[str, Any]:
    from longexposure.data import model_batches
    from longexposure.models import build_model
    from longexposure.reorder import neuron_stats, reorder_mlp_

    per_case = ("policy", "layer", "time_backend", "dtype", "warmup", "reps")
    key = repr({k: v for k, v in asdict(case).items() if k not in per_case}) + str(ctx.device)
    if _CACHE.get("key") == key:
        return _CACHE
    _CACHE.clear()
    model_name, weights = resolve_weights(case.model, case.weights, case.pretrain)
    model = build_model(model_name, weights=weights, device=ctx.device, attn_implementation="eager").eval()
    path = case.data_path
    if path is None and case.dataset == "e2e" and ctx.shared_dir is not None:
        path = str(ctx.shared_dir / "data" / "e2e")
    data = model_batches(model, case.dataset, batch=case.batch, seq_len=case.seq_len, seed=ctx.seed, path=path)
    profile_ids = data.input_ids(case.profile_batches)
    measure_ids = data.input_ids(case.batches)
    reorder_note = "none"
    if case.reorder:
        if not profile_ids:
            raise ValueError("reorder needs profile_batches >= 1")
        reorder_mlp_(model, neuron_stats(model, profile_ids))
        reorder_note = f"by activation mass on {len(profile_ids)} batches disjoint from the measured ones"
    caps = [capture(model, ids) for ids in measure_ids]
    layers = []
    for li in range(len(caps[0])):
        act = torch.cat([c[li].mlp_act for c in caps])  # (batches * B, S, ffn): each batch reduced on its own
        mass = torch.cat([attention_block_mass(c[li].q, c[li].k, case.attn_block) for c in caps])
        layers.append({"act": act, "mass": mass})
    _CACHE.update(
        key=key,
        model=model,
        first=caps[0],  # the first measured batch's captures, for timing
        layers=layers,
        info={
            "weights": str(getattr(model.config, "longexposure_weights", weights or "random-init")),
            "data": data.description,
            "measured": f"{case.batches} batches of {case.batch}x{case.seq_len} "
            f"after {case.profile_batches} profile batches",
            "reorder": reorder_note,
            "sparsity_source": "exposer policies on the exact captured activations / attention probabilities",
        },
    )
    return _CACHE


@TASKS.register(
    "sparsity-profile", case=SparsityProfileCase, help="per-layer density and mass kept of exposer policies"
)
def sparsity_profile(case: SparsityProfileCase, ctx: RunContext) -> dict[str, Any]:
    setup = _setup(case, ctx)
    if not 0 <= case.layer < len(setup["layers"]):
        raise ValueError(f"layer {case.layer} out of range: the model has {len(setup['layers'])} layers")
    layer = setup["layers"][case.layer]
    spec = parse_policy(case.policy)
    b = case.batch
    units = range(0, layer["act"].shape[0], b)  # one decision per operator call (one batch)
    if isinstance(spec, str):
        vals = [per_token_vs_sequence(layer["act"][u : u + b])[FIG4[spec]] for u in units]
        sparsity = sum(vals) / len(vals)
        metrics = {"density": 1.0 - sparsity, "sparsity": sparsity, "mass_kept": 1.0}
    else:
        params = dict(spec.params)
        params.setdefault(
            "block_size" if spec.target == "mlp" else "block",
            case.mlp_block if spec.target == "mlp" else case.attn_block,
        )
        pol = PolicySpec(spec.name, spec.target, params).build()
        rows = [
            mlp_row(pol, layer["act"][u : u + b])
            if spec.target == "mlp"
            else attention_row(pol, layer["mass"][u : u + b])
            for u in units
        ]
        metrics = {k: sum(r[k] for r in rows) / len(rows) for k in ("density", "sparsity", "mass_kept")}
        if case.time_backend is not None:
            metrics.update(_time_pattern(case, setup, spec, pol, ctx))
    ctx.info.update(setup["info"])
    return {**metrics, "info": dict(setup["info"])}


def _time_pattern(case: SparsityProfileCase, setup: dict[str, Any], spec: PolicySpec, pol: Any, ctx: RunContext):
    """fwd / bwd time of `case.time_backend` running the pattern `pol` picks for the first measured batch."""
    from longexposure.exposers import ids_from_mask
    from longexposure.measure import time_fn
    from longexposure.profiling import decoder_layers, layer_part

    cap = setup["first"][case.layer]
    dtype, device = _DTYPES[case.dtype], ctx.device
    gen = torch.Generator(device=device).manual_seed(ctx.seed)
    if spec.target == "mlp":
        from longexposure.registry import MLP_BACKENDS

        layer = decoder_layers(setup["model"])[case.layer]
        fc1, fc2 = layer_part(setup["model"], layer, "fc1"), layer_part(setup["model"], layer, "fc2")
        ids = ids_from_mask(pol.block_mask(cap.mlp_act))
        # copies: the sparse backends re-lay fc2 in place, and the model serves the next cases
        weights = [
            None if t is None else t.detach().to(dtype).clone() for t in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        ]
        backend = MLP_BACKENDS.get(case.time_backend)(block_size=pol.block_size).prepare(*weights)
        x = cap.mlp_in.reshape(-1, cap.mlp_in.shape[-1]).to(dtype).requires_grad_(True)
        fwd = lambda: backend(x, ids)  # noqa: E731
        inputs: tuple[torch.Tensor, ...] = (x,)
        density = ids.numel() * pol.block_size / fc1.weight.shape[0]
    else:
        from longexposure.attention.layout import BlockLayout
        from longexposure.attention_backends import get_backend
        from longexposure.exposers import attention_block_mass, attention_density

        backend = get_backend(case.time_backend)
        mask = pol.block_mask(attention_block_mass(cap.q, cap.k, case.attn_block))
        # the dense policy runs plain causal attention (flash for sdpa), not an all-ones mask
        layout = None if spec.name == "dense" else BlockLayout.from_dense(mask, case.attn_block)
        q, k = (t.detach().to(dtype).contiguous().requires_grad_(True) for t in (cap.q, cap.k))
        v = torch.randn(q.shape, generator=gen, device=device, dtype=dtype).requires_grad_(True)
        fwd = lambda: backend(q, k, v, layout, causal=True)  # noqa: E731
        inputs = (q, k, v)
        density = attention_density(mask).mean().item()
    dy = torch.randn(fwd().shape, generator=gen, device=device, dtype=dtype)
    fwd_stats = time_fn(lambda: fwd(), device, warmup=case.warmup, reps=case.reps)
    both = time_fn(lambda: torch.autograd.grad(fwd(), inputs, dy), device, warmup=case.warmup, reps=case.reps)
    return {
        "fwd_ms": fwd_stats.to_dict(),
        "fwd_bwd_ms": both.to_dict(),
        "bwd_ms": max(both.p50 - fwd_stats.p50, 0.0),
        "timed_density": density,
    }
