"""Task `sparsity-profile`: per-layer density and mass kept of every exposer policy (Fig. 9 left, Fig. 4).

One case is one (policy, layer) of one model on one data set. The model runs once per setup (the
captures are cached for the next cases); neurons are reordered first when `reorder` is set, with the
permutation computed on `profile_batches` batches that are *not* the measured ones.

Policies are written `target/name[:key=value,...]`, e.g. `mlp/threshold:theta=0.1`,
`attention/long-exposure:tau=0.95,snap=false`; `mlp/per-token`, `mlp/per-sequence` and
`mlp/per-batch` give the Fig. 4 contrast (density = fraction of neurons active per token / over a
sequence / over the batch).
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

    def __post_init__(self) -> None:
        parse_policy(self.policy)
        if self.seq_len % self.attn_block:
            raise ValueError(f"seq_len {self.seq_len} is not divisible by attn_block {self.attn_block}")
        if self.batches < 1 or self.profile_batches < 0:
            raise ValueError("need batches >= 1 and profile_batches >= 0")


_CACHE: dict[str, Any] = {}


def resolve_weights(model: str, weights: str | None, pretrain: bool) -> tuple[str, str | None]:
    """(model, weights) for build_model, and a description: pretrained cache, explicit path or random init."""
    from longexposure.pretrain import RECIPES, cache_dir, checkpoint_for

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
    from longexposure.data import load_batches
    from longexposure.models import build_model
    from longexposure.reorder import neuron_stats, reorder_mlp_

    key = repr({k: v for k, v in asdict(case).items() if k not in ("policy", "layer")}) + str(ctx.device)
    if _CACHE.get("key") == key:
        return _CACHE
    _CACHE.clear()
    model_name, weights = resolve_weights(case.model, case.weights, case.pretrain)
    model = build_model(model_name, weights=weights, device=ctx.device, attn_implementation="eager").eval()
    path = case.data_path
    if path is None and case.dataset == "e2e" and ctx.shared_dir is not None:
        path = str(ctx.shared_dir / "data" / "e2e")
    data = load_batches(
        case.dataset,
        batch=case.batch,
        seq_len=case.seq_len,
        vocab_size=model.config.vocab_size,
        path=path,
        seed=ctx.seed,
        device=ctx.device,
        family="opt",
    )
    profile_ids = [next(data)["input_ids"] for _ in range(case.profile_batches)]
    measure_ids = [next(data)["input_ids"] for _ in range(case.batches)]
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
    ctx.info.update(setup["info"])
    return {**metrics, "info": dict(setup["info"])}
