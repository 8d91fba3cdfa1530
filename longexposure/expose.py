"""`expose(model, config)`: patch a Hugging Face OPT / GPT-2 / LLaMA model in place to compute only the
blocks a sparsity source selects, in attention and (ReLU models) in the MLP; `unexpose` restores it.

Modules are patched, not forked: parameter names and module types stay, so `lora`, `adapter`, `bitfit`
and `p-tuning` apply before or after exposure unchanged, with or without a peft wrapper.

- Attention: the model's attention implementation becomes `long_exposure` (registered with
  transformers' AttentionInterface); a forward pre-hook on each attention module hands it this step's
  per-(batch, head) block layout from the source (`attention_backends.set_layout`).
- MLP (OPT, ReLU): `fc1.forward` runs the whole fc1 -> ReLU -> fc2 through a registered MLP backend
  on the source's active neuron blocks; `activation_fn` and `fc2.forward` become pass-throughs (fc2's
  forward hooks, e.g. Houlsby adapters, still run on the MLP output). LoRA adapters on fc1/fc2 are
  handed to the operator, which applies them where the math puts them.

Sparsity sources (`ExposureConfig.source`, per target with `mlp_source` / `attention_source`),
recorded in every report:
    all-active  every block: the exposed model computes exactly the dense model (correctness check)
    replay      per-layer patterns from a recorded profile (`replay.RecordedProfile`); not this
                model's activations, and every report says so
    predicted   live predictors (a saved `PredictorBank` directory, `predictors=`), run once per layer
                per step on the operator's input, under no_grad, before the operator
    oracle      the exposer's true pattern computed from the frozen weights each step (upper bound)
    random      random blocks at the oracle's density each step (the Fig. 11 baseline)
    random-as-predicted  MLP: random blocks, as many as the live predictors keep each step (the control at
                the predicted density; refreshed like `predicted`)
Static sources (all-active, replay) are built once per (layer, sequence length); dynamic ones run
every step, and their densities are those of the last step.

Backends default to `auto`: `triton` where its kernels can run on the device of the model's parameters
when `expose` is called (a GPU, or a CPU under TRITON_INTERPRET=1), else the torch backends
(`torch-gather` MLP, `sdpa` attention), and the report's `backend_choice` says which and why. A named
backend is used as named: one that cannot run here raises `BackendUnavailable` at `expose`, never
replaced by another.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from longexposure.arch import FAMILIES, base_model, family_of, resolve
from longexposure.attention.layout import BlockLayout
from longexposure.backends import BackendUnavailable
from longexposure.predictors.compiled import EAGER as EAGER_CALLS
from longexposure.predictors.compiled import compiled as compiled_call
from longexposure.registry import ATTENTION_BACKENDS, MLP_BACKENDS, SPARSITY_SOURCES
from longexposure.replay import RecordedProfile

SOURCES = tuple(e.name for e in SPARSITY_SOURCES)  # the `sparsity_source` registry (sparsity_sources.py)
AUTO = "auto"
TORCH_BACKENDS = {"mlp": "torch-gather", "attention": "sdpa"}  # `auto` where Triton cannot run
DYNAMIC = tuple(e.name for e in SPARSITY_SOURCES if e.obj.dynamic)
# sources run by a saved PredictorBank's predictors (an MLP one's are what `refresh_every` refreshes)
BANK_SOURCES = ("predicted", "random-as-predicted")
STATE_ATTR = "long_exposure"
_HOW = {  # what to give for a field a sparsity source requires
    "profile": "a profile (RecordedProfile.from_reference(shared_dir) or .load)",
    "predictors": "predictors=<directory of a saved PredictorBank> (train one with `longexposure train-predictors`)",
}


@dataclass
class ExposureConfig:
    """What to expose and how.

    Attributes:
        source: where the patterns come from (see the module docstring).
        attention, mlp: expose attention / the MLP (MLP needs a ReLU MLP).
        attention_backend, mlp_backend: registered backends that run the sparse computation; `auto`
            (default): `triton` where it can run, else the torch backends (the report says which).
        attn_block, mlp_block: tokens per attention block; neurons per MLP block.
        theta: replay MLP filter: keep neuron blocks with mass >= theta x the layer's peak block.
        global_blocks: replay attention layouts: a causal window per head (heads mix two widths to keep
            the layer's recorded density) + this many global blocks.
        profile: the recorded profile for `replay`.
        resample: replay on a model of another depth: stretch the profile's attention densities over
            its layers by relative depth (`RecordedProfile.resampled`; attention only, and reports say so).
        mlp_source, attention_source: per-target source (None: `source`).
        predictors: `predicted`: directory of a saved `PredictorBank` for this model.
        tau: `oracle`/`random` attention: the long-exposure policy's attention-mass target.
        compile_predictors: run `predicted`/`oracle` patterns through torch.compile programs
            (`predictors/compiled.py`): a few fused kernels per layer instead of ~35 (MLP) / ~60
            (attention); compiles once per sequence length, on the first step.
        refresh_every: `predicted` MLP: every this many training steps, recalibrate each layer's predictor
            on that step's batch and retrain it briefly on recent ones (`predictors/refresh.py`), so it
            follows what fine-tuning does to the activations; 0 (default) keeps the offline predictors.
            The refresh runs in `Exposure.after_step()`, after the step (the step itself ran with the
            pattern predicted before it) and outside any CUDA graph: the predictors' weights and
            thresholds are updated in place, so a captured step stays valid.
        refresh_steps: optimizer steps per refresh.
        recall_target: `predicted` MLP: the recall of the exposer's blocks that calibration asks of each predictor,
            offline (`predictors: auto`) and at every refresh; the predicted density follows it (a lower target
            keeps fewer blocks). 0.97 by default.
        refresh_keep_graph: on a GPU, keep the refresh's captured predictor-training step between refreshes and
            replay it (`train_mlp_group(keep=...)`): no eager warm-up steps or capture after the first refresh,
            at the cost of its memory pool held through training (`benchmarks/bench_refresh.py`, variant
            `grouped-kept`, measures both forms).
        reorder: `replay` MLP: first permute each layer's neurons by the profile's recorded mass (exact: fc1
            rows, fc2 columns, LoRA factors; the model computes the same function), so the recorded mass
            concentrates in the first blocks; the report says so.
        mlp_mass: `replay` MLP: keep the fewest blocks holding this fraction of each layer's recorded mass
            (e.g. 0.9) instead of the `theta` filter.
        dense_above: `predicted` MLP with `refresh_every`: after each refresh, a layer whose refreshed predictor
            keeps at least this fraction of the blocks on the refresh batch runs its MLP dense (cuBLAS, its
            predictor not run) until a later refresh predicts below it. Near density 1 the neuron-block
            operator is slower than cuBLAS (0.72-0.76x at 1.0 on the H200, fig12_mlp), and fine-tuning can
            make a layer dense (relu-base on E2E: the top two layers reach 1.0). The first training step
            runs every layer dense (exact), so a compiled model compiles both paths before the timed steps;
            a CUDA-graph trainer captures its step again after a switch (`dense_switches` counts them).
    """

    source: str = "replay"
    attention: bool = True
    mlp: bool = True
    attention_backend: str = AUTO
    mlp_backend: str = AUTO
    attn_block: int = 64
    mlp_block: int = 64
    theta: float = 0.1
    global_blocks: int = 1
    profile: RecordedProfile | None = field(default=None, repr=False)
    mlp_source: str | None = None
    attention_source: str | None = None
    predictors: str | None = None
    tau: float = 0.95
    resample: bool = False
    compile_predictors: bool = False
    refresh_every: int = 0
    refresh_steps: int = 20
    recall_target: float = 0.97
    refresh_keep_graph: bool = False
    reorder: bool = False
    mlp_mass: float | None = None
    dense_above: float | None = None

    def __post_init__(self) -> None:
        for name in ("source", "mlp_source", "attention_source"):
            value = getattr(self, name)
            if value is not None and value not in SOURCES:
                raise ValueError(f"{name}: sparsity source {value!r} is not one of {SOURCES}")
        if not (self.attention or self.mlp):
            raise ValueError("nothing to expose: attention and mlp are both off")
        used = self.sources()
        for name in sorted(set(used.values())):  # what each source needs (its registry entry's `requires`)
            for needed in SPARSITY_SOURCES.get(name).requires:
                if not getattr(self, needed):
                    raise ValueError(f"source {name!r} needs {_HOW[needed]}")
        if self.refresh_every < 0 or self.refresh_steps < 0:
            raise ValueError(f"refresh_every, refresh_steps must be >= 0: {self.refresh_every}, {self.refresh_steps}")
        if (self.reorder or self.mlp_mass is not None) and used.get("mlp") != "replay":
            raise ValueError(f"reorder and mlp_mass shape replayed MLP patterns; the MLP source is {used.get('mlp')!r}")
        if self.mlp_mass is not None and not 0 < self.mlp_mass <= 1:
            raise ValueError(f"mlp_mass must be in (0, 1], got {self.mlp_mass}")
        if not 0 < self.recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target}")
        if self.refresh_keep_graph and not self.refresh_every:
            raise ValueError("refresh_keep_graph keeps the refresh's training graph: it needs refresh_every")
        if self.refresh_every and used.get("mlp") not in BANK_SOURCES:
            raise ValueError(
                f"refresh_every refreshes the MLP predictors of {' and '.join(BANK_SOURCES)}; the MLP source is "
                f"{used.get('mlp')!r}"
            )
        if used.get("attention") == "random-as-predicted":
            raise ValueError("random-as-predicted is an MLP source; attention has `random` (the oracle's density)")
        if self.dense_above is not None and not (self.refresh_every and 0 < self.dense_above <= 1):
            raise ValueError(
                f"dense_above must be in (0, 1] and needs refresh_every (the refresh decides): "
                f"dense_above={self.dense_above}, refresh_every={self.refresh_every}"
            )

    def sources(self) -> dict[str, str]:
        """The source of each exposed target: {"mlp": ..., "attention": ...}."""
        out = {}
        if self.mlp:
            out["mlp"] = self.mlp_source or self.source
        if self.attention:
            out["attention"] = self.attention_source or self.source
        return out


def _lora_of(module: nn.Module, allow_dropout: bool) -> Any:
    """The active peft LoRA adapter of a wrapped linear as an operator `LowRank`, or None."""
    if not hasattr(module, "lora_A"):
        return None
    from longexposure.ops.neuron_block_mlp import LowRank

    names = [n for n in module.active_adapters if n in module.lora_A]
    if len(names) != 1:
        raise ValueError(f"exposure supports one active LoRA adapter per layer, got {names}")
    name = names[0]
    drop = module.lora_dropout[name]
    dropout = None if isinstance(drop, nn.Identity) else drop
    if dropout is not None and not allow_dropout:
        raise ValueError("LoRA dropout on fc2 is not supported by the neuron-block operator; use lora_dropout=0")
    return LowRank(module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name], dropout)


def _param_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the model's (first floating) parameters live: what `auto` backends are chosen for."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _check_backend(target: str, name: str, device: torch.device, dtype: torch.dtype) -> None:
    """The named backend's own capability check; raises `BackendUnavailable` saying why it cannot run."""
    if target == "mlp":
        MLP_BACKENDS.get(name)().check(device, dtype)
    else:
        from longexposure.attention_backends import get_backend

        # the backward is checked when it runs: a CPU forward-only backend (flex) may serve evaluation
        get_backend(name).check(device, dtype, needs_grad=False)


def _why_triton_cannot_run(target: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if `target`'s triton backend can run on (device, dtype), by that backend's own check; else why not."""
    try:
        _check_backend(target, "triton", device, dtype)
    except BackendUnavailable as exc:
        return str(exc)
    return None


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


LAYER_ATTR = "_long_exposure_layer"


def _identity(h: torch.Tensor) -> torch.Tensor:
    """fc2's forward once fc1's runs the whole MLP (one function for every layer)."""
    return h


class LayerState:
    """What one layer's patched forwards read, kept in the patched modules' `__dict__` (no submodule: no
    state-dict key) and reached through the module being called, never through a layer index.

    torch.compile then traces one program for every layer: Dynamo guards a Python int by its value, so a
    forward that looked its layer up by index (`predictors[i]`, a cache keyed by `i`) compiled once per
    layer (fig7 on the H200: 30 frames for 24 layers); tensors and modules reached as attributes are
    guarded by their shape and type, the same in every layer. `index` is for host-side bookkeeping only.
    """

    def __init__(self, exposure: Exposure, index: int):
        self.exposure = exposure  # the layer's patched forwards call back into it
        self.index = index
        self.predictors: dict[str, nn.Module] = {}  # dynamic sources: this layer's predictor per target
        self.cache: dict[tuple, Any] = {}  # static patterns: ("mlp", device) / ("attn", seq_len, device)
        self.last: dict[str, Any] = {}  # dynamic sources: the pattern of the last forward, per target
        self.kept: dict[str, torch.Tensor] = {}  # refresh_every: the MLP input of the last training forward
        self.mlp: dict[str, Any] = {}  # the patched MLP's backend, frozen linears and LoRA factors
        self.dense_mlp = False  # dense_above: this layer's MLP runs dense (cuBLAS), its predictor idle


def _exposed_mlp_forward(fc1: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """fc1 -> ReLU -> fc2 of one layer through the MLP backend (bound to each patched fc1 as its forward)."""
    state: LayerState = fc1.__dict__[LAYER_ATTR]
    return state.exposure._mlp_forward(state, x)

def _warms_refresh(inputs: dict[int, torch.Tensor]) -> bool:
    """Whether the first step warms the refresh path up (`predictors.refresh.warm_up`): on a GPU, where a
    process's first refresh costs about 120 ms of one-offs; on a CPU there is nothing to warm."""
    return any(x.is_cuda for x in inputs.values())


class Exposure:
    """The patch state of one model: what was replaced, the per-layer backends, and what ran."""

    def __init__(self, model: nn.Module, config: ExposureConfig):
        self.model = model
        self.config = config
        self.base = base_model(model)
        self.family = family_of(self.base)
        # where the layers, attention and ReLU MLP are (`arch.FAMILIES`: the MLP only where the neuron-block op fits)
        self.arch = FAMILIES[self.family]
        self.layers = list(resolve(self.base, self.arch.layers))
        self.hf_config = self.base.config
        self._undo: list[Any] = []
        self.layer_states = [LayerState(self, i) for i in range(len(self.layers))]
        self.mlp_density: dict[int, float] = {}
        self.attn_density: dict[int, float] = {}
        self.sources = config.sources()
        self.timer: Any = None  # a measure.Timer: dynamic sources time their predictors as `predict_ms`
        self.training_forwards = 0  # counted by a pre-hook on the model, for refresh_every
        self.steps_done = 0  # after_step() calls
        self.refreshes: dict[int, dict[str, float]] = {}  # per layer, its last refresh
        self._refreshers: dict[int, Any] = {}
        self._refresh_graphs: dict = {}  # refresh_keep_graph: the captured predictor-training steps
        self.refresh_warmup_ms: float | None = None  # the first step's throwaway refresh (GPU), when it ran
        self._step_density: dict[str, list[torch.Tensor]] = {"mlp": [], "attention": []}  # on the device
        self.dense_switches = 0  # dense_above: times the set of dense MLP layers changed (graphs recapture)
        self.pad_replayed_mlp = True  # replayed MLP ids for the Triton operator padded to one shape (`prepare`)
        self._dense_first_step = False
        ffn = getattr(self.hf_config, "ffn_dim", None)
        depth = len(self.layers)
        if config.resample and config.profile is not None and len(config.profile.attn_density or []) != depth:
            if self.sources.get("mlp") == "replay":
                raise ValueError("resample: a resampled profile has attention densities only; set mlp=False")
            config = self.config = dataclasses.replace(config, profile=config.profile.resampled(depth))
        if config.profile is not None and "replay" in self.sources.values():
            config.profile.check_model(len(self.layers), ffn if self.sources.get("mlp") == "replay" else None)
        if config.reorder:  # exact permutation of the weights; the replayed profile follows it
            from longexposure.reorder import reorder_mlp_

            perms = config.profile.neuron_order()
            reorder_mlp_(model, perms=perms)
            config = self.config = dataclasses.replace(config, profile=config.profile.reordered(perms))
        if config.mlp and (self.arch.mlp is None or getattr(self.hf_config, "activation_function", None) != "relu"):
            raise ValueError(
                f"MLP exposure needs a ReLU MLP; {self.family} "
                f"({getattr(self.hf_config, 'activation_function', getattr(self.hf_config, 'hidden_act', '?'))}) "
                "has none: expose attention only (mlp=False)"
            )
        self.config = self._resolve_backends(config)
        self.predictors = self._build_predictors()  # before patching: the oracle reads the unpatched layers
        for target, preds in self.predictors.items():
            for state, pred in zip(self.layer_states, preds, strict=True):
                state.predictors[target] = pred
                # the key exists before any forward: a compiled layer that stores its pattern here then sees
                # the same dict keys on every call (a key added by a later step would recompile the layer:
                # with dense_above, whose first step predicts nothing, that was in the captured step)
                state.last[target] = None

    @property
    def last_mlp_inputs(self) -> dict[int, torch.Tensor]:
        """refresh_every: each layer's MLP input in the last training forward (kept, not copied: in a captured
        step it is the graph's buffer, which every replay rewrites)."""
        return {s.index: s.kept["mlp"] for s in self.layer_states if "mlp" in s.kept}

    @property
    def _last(self) -> dict[tuple[str, int], Any]:
        """The dynamic sources' last pattern per (target, layer)."""
        return {(t, s.index): out for s in self.layer_states for t, out in s.last.items() if out is not None}

    def _resolve_backends(self, config: ExposureConfig) -> ExposureConfig:
        """`auto` backends made concrete for the parameters' device (Triton where it can run, else torch),
        named ones checked there; before anything is patched, so a backend that cannot run patches nothing."""
        device, dtype = _param_device_dtype(self.model)
        chosen: dict[str, str] = {}
        notes = []
        for target in self.sources:
            key = f"{target}_backend"
            name = getattr(config, key)
            if name != AUTO:
                (MLP_BACKENDS if target == "mlp" else ATTENTION_BACKENDS).entry(name)  # unknown names list the valid
                _check_backend(target, name, device, dtype)  # a named backend is never replaced by another
                continue
            why = _why_triton_cannot_run(target, device, dtype)
            chosen[key] = "triton" if why is None else TORCH_BACKENDS[target]
            reason = f"Triton runs on {device.type}" if why is None else f"not triton: {why}"
            notes.append(f"{target} {chosen[key]} (auto: {reason})")
        self.backend_choice = "; ".join(notes) or None  # None: every backend was named
        return dataclasses.replace(config, **chosen) if chosen else config

    @property
    def dynamic(self) -> bool:
        """True when some target's pattern is computed every step (predictors run in the forward)."""
        return any(src in DYNAMIC for src in self.sources.values())

    def _build_predictors(self) -> dict[str, list[nn.Module]]:
        """Per dynamic target, one predictor per layer, in eval mode and frozen."""
        from longexposure.predictors.lowrank import MlpRandomLike
        from longexposure.predictors.offline import PredictorBank

        wanted = {t: src for t, src in self.sources.items() if src in DYNAMIC}
        if not wanted:
            return {}
        out: dict[str, list[nn.Module]] = {}
        from_bank = any(src in BANK_SOURCES for src in wanted.values())
        saved = PredictorBank.load(self.config.predictors, self.model) if from_bank else None
        for target, src in wanted.items():
            if src in BANK_SOURCES:
                if target not in saved.predictors:
                    raise ValueError(
                        f"{self.config.predictors} holds no {target} predictors (it has {list(saved.names)})"
                    )
                preds = saved.predictors[target]
                if src == "random-as-predicted":
                    preds = [MlpRandomLike(p, seed=i) for i, p in enumerate(preds)]
            else:
                opts = (
                    {"block_size": self.config.mlp_block, "theta": self.config.theta}
                    if target == "mlp"
                    else {"attn_block": self.config.attn_block, "tau": self.config.tau}
                )
                bank = PredictorBank.build(
                    self.model,
                    mlp=src if target == "mlp" else None,
                    attention=src if target == "attention" else None,
                    mlp_config=opts,
                    attn_config=opts,
                )
                preds = bank.predictors[target]
            for i, p in enumerate(preds):
                size = p.config.block_size if target == "mlp" else p.config.attn_block
                want = self.config.mlp_block if target == "mlp" else self.config.attn_block
                if size != want:
                    raise ValueError(
                        f"{target} predictor of layer {i} uses blocks of {size}, the exposure {want}: "
                        f"set {'mlp_block' if target == 'mlp' else 'attn_block'}={size}"
                    )
                if target == "mlp":
                    p.config.fixed_capacity = True  # (ids, count) on the device: no host sync per layer
                p.eval().requires_grad_(False)
            out[target] = preds
        return out

    def _predict(self, state: LayerState, target: str, x: torch.Tensor) -> Any:
        timing = self.timer.region("predict_ms") if self.timer is not None else contextlib.nullcontext()
        with timing, torch.no_grad():
            if target == "mlp" and x.dim() == 2:  # OPT flattens (B, S) before fc1; MLP sums over both anyway
                x = x[None]
            # MLP: (ids, count); attention: the layout tables. `random` draws on the host: never compiled.
            use_compiled = self.config.compile_predictors and not SPARSITY_SOURCES.get(self.sources[target]).host_side
            call = compiled_call(target) if use_compiled else EAGER_CALLS[target]
            out = call(state.predictors[target], x.detach())
        if target == "attention":
            out = BlockLayout(self.config.attn_block, *out)
        state.last[target] = out
        return out

    # ------------------------------------------------------------------------------ sources
    # Both sources are static per (layer, shape, device): patterns are built once and reused, so the
    # training step neither rebuilds them nor synchronizes with the host.
    def _mlp_ids(self, state: LayerState, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        key, layer = ("mlp", device), state.index
        if key not in state.cache:
            n_blocks = self.hf_config.ffn_dim // self.config.mlp_block
            ids = self._static_mlp_ids(layer, n_blocks)
            self.mlp_density[layer] = ids.numel() / n_blocks
            count = None
            if self.sources["mlp"] != "all-active" and self.config.mlp_backend == "triton" and self.pad_replayed_mlp:
                # Layers keep different numbers of blocks. Padded to one capacity with the count on the device
                # (the operator's fixed-capacity form, as predicted patterns are), every layer has the same
                # shapes, so a compiled model has one program for all layers: with exact lengths Dynamo
                # compiled one per count (22 frames for OPT-1.3B's 24 replayed layers on the H200, 769661c),
                # and a model with more distinct counts than its recompile limit would fall back to eager.
                # The padding costs memory (every layer keeps compact activations as wide as the widest
                # layer's: 8.19 vs 7.71 GiB for fig7's paper order, 251e819), so `prepare(compiled=False)`
                # keeps exact lengths for a model that is not compiled.
                count = torch.tensor([ids.numel()], dtype=torch.int32, device=device)
                ids = torch.cat([ids, ids.new_zeros(self._mlp_capacity - ids.numel())])
            state.cache[key] = (ids.to(device), count)
        return state.cache[key]

    @functools.cached_property
    def _mlp_capacity(self) -> int:
        """The most replayed MLP blocks any layer keeps (what `_mlp_ids` pads every layer's ids to)."""
        n_blocks = self.hf_config.ffn_dim // self.config.mlp_block
        return max(self._static_mlp_ids(i, n_blocks).numel() for i in range(len(self.layer_states)))

    def _static_mlp_ids(self, layer: int, n_blocks: int) -> torch.Tensor:
        """Layer `layer`'s replayed (or all-active) MLP block ids, increasing, on the host."""
        if self.sources["mlp"] == "all-active":
            return torch.arange(n_blocks, dtype=torch.int32)
        if self.config.mlp_mass is not None:
            return self.config.profile.mlp_blocks_at_mass(layer, self.config.mlp_block, self.config.mlp_mass)
        return self.config.profile.mlp_blocks(layer, self.config.mlp_block, self.config.theta)

    def _layout(self, state: LayerState, seq_len: int, device: torch.device):
        """A (1, 1, NQ, NK) layout (all-active) or (1, H, NQ, NK) (replay); backends broadcast size-1 dims."""
        from longexposure.mask_policies import mask_layout

        key, layer = ("attn", seq_len, device), state.index
        if key not in state.cache:
            block = self.config.attn_block
            n = -(-seq_len // block)
            if self.sources["attention"] == "all-active":
                layout = mask_layout("dense", 1, 1, seq_len, block, device=device)
            else:  # per-head windows at the layer's recorded density (`RecordedProfile.attention_windows`)
                g = self.config.global_blocks
                windows = self.config.profile.attention_windows(layer, n, self.hf_config.num_attention_heads, g)
                band = {
                    w: mask_layout("longformer", 1, 1, seq_len, block, device=device, window_blocks=w, global_blocks=g)
                    for w in set(windows)
                }
                # (1, H, NQ, NK) in every layer (the backends broadcast the batch dim): one shape for all
                # layers, so a compiled model keeps one program
                layout = BlockLayout.from_dense(torch.cat([band[w].to_dense() for w in windows], 1), block)
            self.attn_density[layer] = float(layout.density(causal=True))
            state.cache[key] = layout.with_transpose()  # the backward's transposed table, built once
        return state.cache[key]

    def prepare(self, seq_len: int, device: torch.device | str, *, compiled: bool = True) -> None:
        """Build every layer's patterns for `seq_len` now (they are cached), so that torch.compile and
        CUDA-graph capture only see cache lookups, never the host-side building. `compiled=False` (the model
        will not be compiled) keeps replayed MLP ids at their exact lengths instead of padding them to one
        shape for every layer (`pad_replayed_mlp`)."""
        if compiled != self.pad_replayed_mlp:
            self.pad_replayed_mlp = compiled
            for state in self.layer_states:  # built before with the other form
                for key in [k for k in state.cache if k[0] == "mlp"]:
                    del state.cache[key]
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        for state in self.layer_states:
            if self.sources.get("attention") in ("all-active", "replay"):
                self._layout(state, seq_len, device)
            if self.sources.get("mlp") in ("all-active", "replay"):
                self._mlp_ids(state, device)

    # ------------------------------------------------------------------------------ patching
    def patch(self) -> None:
        try:
            if self.config.attention:
                self._patch_attention()
            if self.config.mlp:
                for i, layer in enumerate(self.layers):
                    self._patch_mlp(i, layer)
            if self.config.refresh_every:
                handle = self.model.register_forward_pre_hook(self._training_forward, with_kwargs=True)
                self._undo.append(handle.remove)
        except Exception:
            self.unpatch()
            raise

    def _patch_attention(self) -> None:
        from longexposure.attention_backends import SLOT_ATTR, register_transformers_attention, set_layout

        for i, layer in enumerate(self.layers):
            attn = resolve(layer, self.arch.attn)
            p = getattr(attn, "attention_dropout", getattr(attn, "dropout", 0.0))
            p = p.p if isinstance(p, nn.Dropout) else p
            if p and self.model.training:
                raise ValueError(
                    f"layer {i}: attention dropout {p} is not supported by sparse attention; "
                    "build the model with attention dropout 0"
                )
        name = register_transformers_attention()
        old = self.hf_config._attn_implementation
        self._set_attn_implementation(name)
        self._undo.append(lambda: self._set_attn_implementation(old))
        hook = self._attention_pre_hook  # one object for every layer: one compiled program
        for state, layer in zip(self.layer_states, self.layers, strict=True):
            attn = resolve(layer, self.arch.attn)
            attn.__dict__[LAYER_ATTR] = state
            set_layout(attn, None, backend=self.config.attention_backend)  # the slot exists before any trace
            handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
            self._undo.append(handle.remove)
            self._undo.append(lambda attn=attn: attn.__dict__.pop(SLOT_ATTR, None))
            self._undo.append(lambda attn=attn: attn.__dict__.pop(LAYER_ATTR, None))

    def _attention_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Hand this step's layout of the module's layer to the attention implementation."""
        from longexposure.attention_backends import set_layout

        state: LayerState = module.__dict__[LAYER_ATTR]
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if self.sources["attention"] in DYNAMIC:
            layout = self._predict(state, "attention", hidden)
        else:
            layout = self._layout(state, hidden.shape[1], hidden.device)
        set_layout(module, layout)

    def _set_attn_implementation(self, name: str) -> None:
        for cfg in {id(c): c for c in (self.hf_config, getattr(self.base, "config", None)) if c is not None}.values():
            cfg._attn_implementation = name

    def _patch_mlp(self, i: int, layer: nn.Module) -> None:
        fc1_name, fc2_name, act_name = self.arch.mlp.fc1, self.arch.mlp.fc2, self.arch.mlp.act
        fc1, fc2 = getattr(layer, fc1_name), getattr(layer, fc2_name)
        base1, base2 = getattr(fc1, "base_layer", fc1), getattr(fc2, "base_layer", fc2)
        backend = MLP_BACKENDS.get(self.config.mlp_backend)(block_size=self.config.mlp_block)
        backend.prepare(base1.weight, base1.bias, base2.weight, base2.bias)
        state = self.layer_states[i]
        dense = None
        if self.config.dense_above is not None:
            from longexposure.mlp_backends import DenseMLP

            dense = DenseMLP(block_size=self.config.mlp_block)
            dense.prepare(base1.weight, base1.bias, base2.weight, base2.bias)
        state.mlp.update(
            backend=backend,
            dense=dense,
            base1=base1,
            base2=base2,
            patched=(base1.weight, base2.weight),  # the tensors prepared here (FSDP replaces them: `_mlp_forward`)
            fc1=fc1,
            fc2=fc2,
            lora1=_lora_of(fc1, allow_dropout=True),
            lora2=_lora_of(fc2, allow_dropout=False),
        )
        original_act = getattr(layer, act_name)
        fc1.__dict__[LAYER_ATTR] = state
        fc1.forward = types.MethodType(_exposed_mlp_forward, fc1)
        fc2.forward = _identity
        setattr(layer, act_name, nn.Identity())
        self._undo.append(lambda: setattr(base2.weight, "data", base2.weight.data.contiguous()))
        self._undo.append(lambda: setattr(layer, act_name, original_act))
        self._undo.append(lambda: fc2.__dict__.pop("forward", None))
        self._undo.append(lambda: fc1.__dict__.pop("forward", None))
        self._undo.append(lambda: fc1.__dict__.pop(LAYER_ATTR, None))

    def _mlp_forward(self, state: LayerState, x: torch.Tensor) -> torch.Tensor:
        mlp = state.mlp
        base1, base2, backend = mlp["base1"], mlp["base2"], mlp["backend"]
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x_mlp = x.to(dtype)  # what the MLP multiplies (under bf16 autocast the residual stream is fp32)
        if self.config.refresh_every and self.model.training and torch.is_grad_enabled():
            # for the refresh `after_step` may run (counted in `_training_forward`), in that dtype: an fp32 copy made
            # the refresh's fc1 and predictor training fp32 matmuls (H200 profile at 77ef17a: 42 of 82 ms in GEMMs)
            state.kept["mlp"] = x_mlp
        if state.dense_mlp:
            backend, ids, count = mlp["dense"], None, None
        elif self.sources["mlp"] in DYNAMIC:
            ids, count = self._predict(state, "mlp", x)
        else:
            ids, count = self._mlp_ids(state, x.device)
        weights = (base1.weight, base1.bias, base2.weight, base2.bias)
        cast = tuple(_cast(t, dtype) for t in weights)
        # FSDP2 (`distributed.wrap_fsdp`) gathers a layer's parameters into its own tensors for each forward: the
        # backend then multiplies those (re-laid out as its own copy) and the LoRA factors are read again
        gathered = weights[0] is not mlp["patched"][0] or weights[2] is not mlp["patched"][1]
        # fp32 weights under autocast: this step's low-precision copy; and back to the weights themselves when a
        # step without autocast follows one with it (the backend still holds that step's copy)
        stale = backend.fc1_weight is not None and backend.fc1_weight.dtype != dtype
        if gathered or stale or any(c is not t for c, t in zip(cast, weights, strict=True)):
            backend.prepare(*cast, in_place=not gathered or cast[2] is not weights[2])
        loras = (mlp["lora1"], mlp["lora2"])
        if gathered:
            loras = (_lora_of(mlp["fc1"], allow_dropout=True), _lora_of(mlp["fc2"], allow_dropout=False))
        l1, l2 = (
            None if lr is None else type(lr)(_cast(lr.a, dtype), _cast(lr.b, dtype), lr.scaling, lr.dropout)
            for lr in loras
        )
        with torch.autocast(x.device.type, enabled=False):
            return backend(x_mlp, ids, count, fc1_lora=l1, fc2_lora=l2)

    def _training_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """refresh_every: a forward pre-hook on the whole model (never compiled, unlike the layers, whose
        programs would otherwise guard on this counter and recompile every step): count training forwards and
        make the refreshers on the first."""
        from longexposure.predictors.refresh import MlpRefresher, RefreshConfig

        if not (self.model.training and torch.is_grad_enabled()):
            return
        if self.steps_done == 0 and self.training_forwards >= 2 * self.config.refresh_every:
            raise RuntimeError(
                f"refresh_every={self.config.refresh_every}: {self.training_forwards} training forwards and "
                "exposure.after_step() was never called, so no refresh ran (call it after each optimizer "
                "step; longexposure.training.Trainer does)"
            )
        if self.config.dense_above is not None and self.training_forwards == 0:
            self._dense_first_step = True  # both MLP paths run (and compile) before any timed step
            for state in self.layer_states:
                state.dense_mlp = True
        self.training_forwards += 1
        if not self._refreshers:
            config = RefreshConfig(steps=self.config.refresh_steps, recall_target=self.config.recall_target)
            for state in self.layer_states:
                pred, fc1 = state.predictors["mlp"], state.mlp["base1"]
                pred = getattr(pred, "predictor", pred)  # random-as-predicted: the predictor that sets the count
                self._refreshers[state.index] = MlpRefresher(pred, fc1, config, seed=state.index)

    def after_step(self, timer: Any = None) -> None:
        """Call after each training step (the optimizer step included), outside any CUDA graph.

        Records the density each dynamic target's patterns had in this step (on the device: no host sync),
        and with `refresh_every`, every N-th step refreshes each layer's MLP predictor on that step's MLP
        inputs: recalibrate its threshold on this batch, then a few optimizer steps on recent batches. The
        step has already run with the pattern predicted before the refresh; the next step uses the refreshed
        predictor. Weights and thresholds change in place, so a CUDA graph that captured the predictors
        replays the refreshed ones. All layers refresh in one call (`refresh_layers`: their predictors train
        together, and the report rows come back in one host read). A `measure.Timer` times the refresh as
        `refresh_ms`. On a GPU the first step also runs a throwaway refresh on copies of the predictors
        (`predictors.refresh.warm_up`, `refresh_warmup_ms`): a process's first refresh pays one-offs that would
        otherwise land in a timed step.
        """
        from longexposure.predictors.refresh import refresh_layers, warm_up

        self.steps_done += 1
        self._record_step_density()
        if self._dense_first_step:
            self._dense_first_step = False
            self._set_dense_mlp({s.index: False for s in self.layer_states})
        if not self.config.refresh_every:
            return
        if self.steps_done == 1 and self.last_mlp_inputs and _warms_refresh(self.last_mlp_inputs):
            self.refresh_warmup_ms = warm_up(self._refreshers, self.last_mlp_inputs, self.config.refresh_keep_graph)
        due = self.steps_done % self.config.refresh_every == 0 and self.last_mlp_inputs
        # timed every step (zero when none is due), so every step has the same phases
        timing = timer.region("refresh_ms") if timer is not None else contextlib.nullcontext()
        with timing:
            keep = self._refresh_graphs if self.config.refresh_keep_graph else None
            rows = refresh_layers(self._refreshers, self.last_mlp_inputs, keep=keep) if due else {}
        for layer, row in rows.items():
            self.refreshes[layer] = {**row, "layer": layer, "step": self.steps_done}
        if rows and self.config.dense_above is not None:
            self._set_dense_mlp({layer: row["density_after"] >= self.config.dense_above for layer, row in rows.items()})

    @contextlib.contextmanager
    def mlp_patterns_from(self, predictors: list[nn.Module]) -> Any:
        """Within: every layer's MLP runs sparse on `predictors[i]`'s (ids, count) instead of its own predictor's
        (no dense fallback; compiled code runs eagerly). For evaluation: the same fine-tuned weights with
        other blocks kept (`held_out.mlp_pattern_swaps`)."""
        if self.sources.get("mlp") not in DYNAMIC:
            raise ValueError(f"mlp_patterns_from needs a dynamic MLP source, not {self.sources.get('mlp')!r}")
        if len(predictors) != len(self.layer_states):
            raise ValueError(f"{len(predictors)} predictors for {len(self.layer_states)} layers")
        saved = [(s.predictors["mlp"], s.dense_mlp, s.last.get("mlp")) for s in self.layer_states]
        try:
            for state, pred in zip(self.layer_states, predictors, strict=True):
                state.predictors["mlp"], state.dense_mlp = pred, False
            with torch.compiler.set_stance("force_eager"):
                yield
        finally:
            for state, (pred, dense, last) in zip(self.layer_states, saved, strict=True):
                state.predictors["mlp"], state.dense_mlp, state.last["mlp"] = pred, dense, last

    def _set_dense_mlp(self, dense: dict[int, bool]) -> None:
        """dense_above: set which layers run their MLP dense; a change bumps `dense_switches`."""
        changed = False
        for layer, value in dense.items():
            state = self.layer_states[layer]
            changed |= state.dense_mlp != value
            state.dense_mlp = value
        self.dense_switches += changed

    def _record_step_density(self) -> None:
        """This step's mean density per dynamic target, as a device tensor (read once, in `report`)."""
        n_blocks = self.hf_config.ffn_dim // self.config.mlp_block if self.config.mlp else 0
        per_target: dict[str, list[torch.Tensor]] = {"mlp": [], "attention": []}
        for state in self.layer_states:
            if state.dense_mlp:  # every block ran (a prediction left in `last` would be stale)
                per_target["mlp"].append(torch.ones((), device=state.mlp["base1"].weight.device))
            elif state.last.get("mlp") is not None:
                ids, count = state.last["mlp"]
                kept = torch.tensor(float(ids.numel()), device=ids.device) if count is None else count.float().sum()
                per_target["mlp"].append(kept / n_blocks)
            if state.last.get("attention") is not None:
                per_target["attention"].append(state.last["attention"].density(causal=True).float())
        for target, values in per_target.items():
            if values:
                self._step_density[target].append(torch.stack(values).mean())

    def unpatch(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _densities_of_last_step(self) -> None:
        """Densities of the dynamic sources' last patterns (synchronizes: for reports, not the hot path)."""
        n_blocks = self.hf_config.ffn_dim // self.config.mlp_block if self.config.mlp else 0
        for state in self.layer_states:
            mlp, attention = state.last.get("mlp"), state.last.get("attention")
            if state.dense_mlp:  # every block ran (a prediction left in `last` would be stale)
                self.mlp_density[state.index] = 1.0
            elif mlp is not None:
                ids, count = mlp
                self.mlp_density[state.index] = (ids.numel() if count is None else int(count.item())) / n_blocks
            if attention is not None:
                self.attn_density[state.index] = float(attention.density(causal=True))

    def report(self) -> dict[str, Any]:
        """Per-layer densities of the last step and what produced them (for result records)."""
        self._densities_of_last_step()
        described = {}
        for target, src in self.sources.items():
            if src == "replay":
                src = f"replay: {self.config.profile.source} (recorded, not predicted from this model)"
                if target == "mlp" and self.config.reorder:
                    src += "; this model's MLP neurons permuted to that order (exact)"
                if target == "mlp" and self.config.mlp_mass is not None:
                    src += f"; MLP blocks holding {self.config.mlp_mass:g} of each layer's recorded mass"
            elif src in BANK_SOURCES:
                src = (
                    f"predicted: live predictors from {self.config.predictors}"
                    if src == "predicted"
                    else f"random-as-predicted: random blocks, as many as the live predictors from "
                    f"{self.config.predictors} keep"
                )
                if target == "mlp" and self.config.refresh_every:
                    src += (
                        f", MLP predictors refreshed every {self.config.refresh_every} training steps on that "
                        f"step's batch ({self.config.refresh_steps} optimizer steps + slack recalibration)"
                    )
                    if self.config.refresh_keep_graph:
                        src += ", their captured training step kept between refreshes"
                    if self.refresh_warmup_ms is not None:
                        src += " (a throwaway refresh on copies after the first step warmed the process up)"
                if target == "mlp" and self.config.dense_above is not None:
                    src += (
                        f"; a layer whose refreshed prediction keeps >= {self.config.dense_above:g} of the blocks "
                        "runs its MLP dense (cuBLAS), and every layer does in the first step"
                    )
            elif src in ("oracle", "random"):
                src = f"{src}: computed from this model's frozen weights every step"
            described[target] = src
        texts = set(described.values())
        source = texts.pop() if len(texts) == 1 else "; ".join(f"{t}: {d}" for t, d in described.items())
        mean = lambda d: sum(d.values()) / len(d) if d else None  # noqa: E731
        over_steps = {
            f"{'mlp' if t == 'mlp' else 'attention'}_block_density_mean_over_steps": float(torch.stack(v).mean())
            for t, v in self._step_density.items()
            if v
        }
        return {
            **over_steps,
            **({"steps_recorded": self.steps_done} if over_steps else {}),
            **({"refresh_warmup_ms": self.refresh_warmup_ms} if self.refresh_warmup_ms is not None else {}),
            "sparsity_source": source,
            "attention_backend": self.config.attention_backend if self.config.attention else None,
            "mlp_backend": self.config.mlp_backend if self.config.mlp else None,
            "backend_choice": self.backend_choice,
            "mlp_block_density": mean(self.mlp_density),
            "attention_block_density_of_causal": mean(self.attn_density),
            "mlp_density_per_layer": dict(self.mlp_density),
            "attention_density_per_layer": dict(self.attn_density),
            **({"mlp_refreshes": list(self.refreshes.values())} if self.config.refresh_every else {}),
            **(
                {
                    "mlp_dense_layers": [s.index for s in self.layer_states if s.dense_mlp],
                    "mlp_dense_switches": self.dense_switches,
                }
                if self.config.dense_above is not None
                else {}
            ),
        }


def expose(model: nn.Module, config: ExposureConfig | None = None, **overrides: Any) -> Exposure:
    """Patch `model` in place (see the module docstring); returns the `Exposure` (also `model.long_exposure`).

    Keyword `overrides` are ExposureConfig fields; with a `config` they replace its fields (a copy: the
    caller's config is unchanged), so `expose(model, config, mlp=False)` exposes attention only.
    """
    if getattr(model, STATE_ATTR, None) is not None:
        raise ValueError("model is already exposed; call unexpose(model) first")
    config = ExposureConfig(**overrides) if config is None else dataclasses.replace(config, **overrides)
    exposure = Exposure(model, config)
    exposure.patch()
    object.__setattr__(model, STATE_ATTR, exposure)
    return exposure


def unexpose(model: nn.Module) -> None:
    """Undo `expose`: original forwards, activation, attention implementation and weight layout."""
    exposure = getattr(model, STATE_ATTR, None)
    if exposure is None:
        raise ValueError("model is not exposed")
    exposure.unpatch()
    with contextlib.suppress(AttributeError):
        object.__delattr__(model, STATE_ATTR)
