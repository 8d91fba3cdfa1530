"""One definition of a fine-tuning step, shared by the timing suites and `longexposure finetune`.

Mixed precision as the paper and users run it: `fp16-amp` keeps trainable parameters in fp32 and
frozen ones in fp16 under fp16 autocast with a gradient scaler (`bf16-amp` likewise, no scaler).
Each step marks the phases every suite reports: forward (incl. loss), backward, optimizer (incl.
scaler update and zeroing grads), and the whole step.

`cuda_graph=True` captures forward + backward of one step in a CUDA graph (after `GRAPH_WARMUP` eager
steps on a side stream, more while a step still compiles frames) and replays it every step: on a fast GPU
a 1B-parameter model's step is bound by the host's kernel launches, which a graph removes for dense and
sparse models alike. The phases are
then `forward_backward_ms` (the replay) and `optimizer_ms` (fused AdamW, outside the graph).
It needs static shapes and no host sync inside the model. An exposure whose `dense_above` switches layers
between the dense and the sparse MLP changes the step: the graph is dropped, and eager warm-up steps and a
capture follow (timed like every step).

`compile=True` compiles every decoder layer and the loss with Inductor (`longexposure.compiled_model`);
with `cuda_graph` the warm-up steps compile and the capture records Inductor's kernels: the strongest
dense baseline is compile + graph. Every variant uses fused AdamW on a GPU (one kernel for all
parameters; the gradient scaler hands it the scale and inf flag on the device, no host sync), and under
autocast PEFT layers skip their cast of activations to the fp32 adapter dtype (autocast casts the small
adapter weights instead: the same low-precision matmul without two activation-sized copies per adapter).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from longexposure import distributed
from longexposure.data import load_batches
from longexposure.hf_compat import causal_mask_under_capture
from longexposure.measure import Timer
from longexposure.methods.builtin import apply_method
from longexposure.models import build_model, family_of
from longexposure.registry import DATA_PARALLEL, SPARSITY_SOURCES, TRAINING_LOSSES

PRECISIONS = {"fp32": None, "fp16-amp": torch.float16, "bf16-amp": torch.bfloat16}
GRAPH_WARMUP = 2
MAX_GRAPH_WARMUP = 5  # eager steps before a capture at most, while they keep compiling frames


def _frames_compiled() -> int:
    """Frames Dynamo has compiled in this process (0 before any compilation)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"].get("ok", 0))


@dataclass
class TrainingSetup:
    """Model, method, data and numerics of a fine-tuning run.

    Attributes:
        model: preset name, or a local checkpoint directory / hub id.
        weights: checkpoint to load into a preset's architecture (None: random init).
        method: PEFT method name; method_options: its keyword arguments.
        attn: attention implementation (`eager`, `sdpa`, or a registered AttentionInterface name).
        dataset, data_path: dataset name and where its files are; data_split: the dataset's split (e2e:
            `train` / `held-out`, disjoint meaning representations; corpus: the stream pretraining trains on / the
            tail it holds out; None: the dataset's default).
        batch: sequences per step (per rank under torchrun: the global batch is batch x ranks).
        precision: `fp32`, `fp16-amp` or `bf16-amp`.
        compile: compile each decoder layer and the loss with torch.compile (see the module docstring).
        cuda_graph: capture forward + backward in a CUDA graph and replay it (see the module docstring);
            combines with `compile`.
        model_options: config overrides for the model (e.g. attn_pdrop=0.0).
        exposure: `expose.ExposureConfig` fields for Long Exposure (None: the dense model); its
            `profile` is `reference` (the paper artifact's OPT-1.3B profile under the shared directory)
            or the path of a recorded profile JSON.
        loss: the `training_loss` that turns a batch into the loss (`longexposure/losses.py`): `model` (the
            model's forward with labels) or `fused-linear-ce` (no logits tensor: projection + cross-entropy in
            chunks).
        data_parallel: the `data_parallel` engine under torchrun (`longexposure/distributed.py`): `ddp` or
            `fsdp` (parameters sharded over the ranks; no cuda_graph, compile, or predictor refresh with it).
        narrow_mlp: a speed yardstick, not a method (`longexposure.narrow`): {profile, theta, block}
            cuts each layer's MLP to the neuron blocks the replayed profile keeps, as dense layers of
            exactly that width (what an ideal neuron-block operator would cost); combine with an
            `exposure` whose `mlp` is false to expose attention only.
    """

    model: str = "opt-tiny"
    weights: str | None = None
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    attn: str = "sdpa"
    batch: int = 4
    seq_len: int = 512
    dataset: str = "synthetic"
    data_path: str | None = None
    data_split: str | None = None
    precision: str = "fp16-amp"
    lr: float = 1e-4
    compile: bool = False
    cuda_graph: bool = False
    model_options: dict[str, Any] = field(default_factory=dict)
    exposure: dict[str, Any] | None = None
    narrow_mlp: dict[str, Any] | None = None
    loss: str = "model"
    data_parallel: str = "ddp"

    def __post_init__(self) -> None:
        TRAINING_LOSSES.entry(self.loss)  # an unknown name lists the valid ones
        DATA_PARALLEL.entry(self.data_parallel)
        if self.data_parallel == "fsdp":
            unsupported = [k for k in ("cuda_graph", "compile") if getattr(self, k)]
            if (self.exposure or {}).get("refresh_every"):
                unsupported.append("exposure.refresh_every")
            if unsupported:
                raise ValueError(
                    f"data_parallel 'fsdp' does not combine with {', '.join(unsupported)} yet: FSDP gathers and "
                    "frees each layer's weights around its forward (see longexposure/distributed.py); use 'ddp'"
                )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {sorted(PRECISIONS)}")
        sources = {k: v for k, v in (self.exposure or {}).items() if k in ("source", "mlp_source", "attention_source")}
        host_side = sorted(
            {f"`{s}`" for s in sources.values() if s in SPARSITY_SOURCES and SPARSITY_SOURCES.get(s).host_side}
        )
        if self.cuda_graph and host_side:
            raise ValueError(
                f"cuda_graph cannot replay the {', '.join(host_side)} sparsity source: it draws its blocks on the host "
                "every step; run it without cuda_graph"
            )
        if self.narrow_mlp is not None:
            unknown = sorted(set(self.narrow_mlp) - {"profile", "theta", "block"})
            if unknown or "profile" not in self.narrow_mlp:
                raise ValueError(
                    f"narrow_mlp takes profile (required), theta and block; got {sorted(self.narrow_mlp)}"
                )
            if self.exposure is not None and self.exposure.get("mlp", True):
                raise ValueError("narrow_mlp replaces the MLP: its exposure must set mlp: false")


def prepare_model(
    setup: TrainingSetup, device: torch.device, seed: int = 0
) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """Build the model, apply the method, and place parameters in their training dtypes. Returns the model and
    what `narrow_mlp` did to it (profile, theta, block, mlp_density_per_layer; None without narrow_mlp)."""
    model = build_model(
        setup.model,
        weights=setup.weights,
        attn_implementation=setup.attn,
        device=device,
        seed=seed,
        **setup.model_options,
    )
    model.config.use_cache = False  # training: no KV cache (it also makes torch.compile recompile per layer)
    narrowed = None
    if setup.narrow_mlp is not None:
        from longexposure.narrow import narrow_to_profile_

        opts = setup.narrow_mlp
        profile, theta, block = load_profile(opts["profile"]), float(opts.get("theta", 0.1)), int(opts.get("block", 64))
        narrowed = {
            "profile": profile.source,
            "theta": theta,
            "block": block,
            "mlp_density_per_layer": narrow_to_profile_(model, profile, theta, block),
        }
    torch.manual_seed(seed)  # the method's own initialisation (e.g. LoRA's A) repeats run to run, weights loaded or not
    model = apply_method(model, setup.method, **setup.method_options)
    low = PRECISIONS[setup.precision]
    if low is not None:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(low)
        for module in model.modules():  # peft: autocast does the casting (see the module docstring)
            if hasattr(module, "cast_input_dtype_enabled"):
                module.cast_input_dtype_enabled = False
    return model, narrowed


def split_option(split: str | None) -> dict[str, str]:
    """`load_batches` options for a split (none when the dataset's default is wanted)."""
    return {} if split is None else {"split": split}


def load_profile(profile: str):
    """A recorded profile by suite/CLI name: `reference` (the paper artifact's, under the shared directory)
    or the path of a profile JSON."""
    from longexposure.replay import RecordedProfile

    if profile == "reference":
        from longexposure.paths import shared_dir

        root = shared_dir()
        if root is None:
            raise FileNotFoundError("profile 'reference' needs the shared directory: set LONGEXPOSURE_SHARED")
        return RecordedProfile.from_reference(root)
    return RecordedProfile.load(profile)


def expose_from_options(model: torch.nn.Module, options: dict[str, Any]):
    """`expose` from plain suite/CLI options; a `profile` name or path becomes a RecordedProfile."""
    from longexposure.expose import ExposureConfig, expose

    options = dict(options)
    profile = options.pop("profile", None)
    if profile is not None:
        options["profile"] = load_profile(profile)
    try:
        config = ExposureConfig(**options)
    except TypeError as exc:
        raise ValueError(f"exposure options: {exc}") from None
    return expose(model, config)


class Trainer:
    """A model + method + AdamW + data stream that takes timed steps."""

    def __init__(self, setup: TrainingSetup, device: torch.device | str, seed: int = 0):
        self.setup = setup
        # under torchrun: join the job (this rank's device), train on this rank's slice of each global batch
        self.dp, self.device = distributed.join(torch.device(device))
        # narrowed_mlp: what setup.narrow_mlp cut (None without it), for describe()
        self.model, self.narrowed_mlp = prepare_model(setup, self.device, seed)
        self.exposure = None
        if setup.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph needs a CUDA device, got {self.device}")
        if setup.compile or (setup.exposure or {}).get("compile_predictors"):
            from longexposure.compiled_model import fresh_dynamo

            fresh_dynamo()  # this model's programs only, counted from here (see compiled_model)
        if setup.exposure is not None:
            self.exposure = expose_from_options(self.model, setup.exposure)
            # patterns built now, so torch.compile and CUDA graphs only ever see cache lookups
            self.exposure.prepare(setup.seq_len, self.device, compiled=setup.compile)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_warm = 0
        self._warm_compiled = False  # the last eager warm-up step compiled a frame
        self._graph_switches = 0  # the exposure's `dense_switches` when the graph was captured
        self._static_batch: dict[str, torch.Tensor] = {}
        self._static_loss: torch.Tensor | None = None
        self.steps_taken = 0
        self.graph_captures: list[int] = []  # the step (from 0) of each CUDA-graph capture, recaptures included
        self.compiled: dict[str, Any] = {}
        if setup.compile:
            from longexposure.compiled_model import compile_layers_

            self.compiled = compile_layers_(self.model)
        if self.dp is not None and setup.loss != "model":
            raise ValueError(
                f"training_loss {setup.loss!r} bypasses the data-parallel wrapper's forward; use 'model' under "
                "torchrun"
            )
        self.forward = self.model
        if self.dp is not None:
            self.forward = distributed.wrap(self.model, self.dp, self.device, setup.data_parallel)
        self.loss_fn = TRAINING_LOSSES.get(setup.loss)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        fused = self.device.type == "cuda" and all(p.is_floating_point() for p in self.trainable)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=setup.lr, fused=fused or None)
        use_scaler = setup.precision == "fp16-amp" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.batches = load_batches(
            setup.dataset,
            batch=distributed.global_batch(setup.batch, self.dp),
            seq_len=setup.seq_len,
            vocab_size=self.model.config.vocab_size,
            path=setup.data_path,
            seed=seed,
            device=self.device,
            family=family_of(self.model),
            **split_option(setup.data_split),
        )

    def _autocast(self):
        low = PRECISIONS[self.setup.precision]
        if low is None:
            return contextlib.nullcontext()
        # a graph cannot keep autocast's cast cache across replays: casts are recomputed in the graph
        return torch.autocast(self.device.type, dtype=low, cache_enabled=not self.setup.cuda_graph)

    def step(self, timer: Timer) -> torch.Tensor:
        """One optimizer step on the next batch; returns the (detached) loss without a host sync."""
        batch = distributed.shard(next(self.batches), self.dp)
        self.steps_taken += 1
        if self.setup.cuda_graph:
            return self._graph_step(batch, timer)
        if self.exposure is not None and self.exposure.dynamic and not self.setup.compile:
            # live predictors mark `predict_ms` inside the forward (not inside compiled layers: a host timer
            # there would break the graph)
            self.exposure.timer = timer
        with timer.region("total_ms"):
            with timer.region("forward_ms"), self._autocast():
                loss = self.loss_fn(self.forward, batch)
            with timer.region("backward_ms"):
                self.scaler.scale(loss).backward()
            with timer.region("optimizer_ms"):
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
            if self.exposure is not None:
                self.exposure.after_step(timer)  # step densities; predictor refreshes (outside the step's graph)
        return loss.detach()

    def _forward_backward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self._autocast():
            loss = self.loss_fn(self.forward, batch)
        self.scaler.scale(loss).backward()
        return loss

    def _graph_step(self, batch: dict[str, torch.Tensor], timer: Timer) -> torch.Tensor:
        switches = self.exposure.dense_switches if self.exposure is not None else 0
        if self._graph is not None and switches != self._graph_switches:
            self._drop_graph()  # the exposure changed which layers run dense: warm up and capture again
        with timer.region("total_ms"):
            with timer.region("forward_backward_ms"):
                if self._graph is not None:
                    for name, t in self._static_batch.items():
                        t.copy_(batch[name])
                    self._graph.replay()
                    loss = self._static_loss
                elif self._warming_up():  # eager, on a side stream, as capture will be
                    frames = _frames_compiled()
                    side = torch.cuda.Stream(self.device)
                    side.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(side):
                        loss = self._forward_backward(batch)
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    self._graph_warm += 1
                    self._warm_compiled = _frames_compiled() > frames
                else:
                    loss = self._capture(batch)
            with timer.region("optimizer_ms"):
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self._graph is None:
                    self.optimizer.zero_grad(set_to_none=True)
                # with a graph, the replay overwrites the gradient buffers it owns: never free them
            if self.exposure is not None:
                self.exposure.after_step(timer)
        return loss.detach().clone()

    def _warming_up(self) -> bool:
        """Another eager step before the capture: fewer than GRAPH_WARMUP so far, or (up to MAX_GRAPH_WARMUP) the
        last one compiled a frame. A frame compiled during capture would run Inductor's autotuning there, which
        synchronizes and invalidates the capture; a step that compiled nothing shows the next one will not."""
        return self._graph_warm < GRAPH_WARMUP or (self._warm_compiled and self._graph_warm < MAX_GRAPH_WARMUP)

    def _drop_graph(self) -> None:
        """Forget the captured step (its gradient buffers too: the next steps run eagerly, then capture anew)."""
        self._graph, self._graph_warm, self._warm_compiled = None, 0, False
        self._static_batch, self._static_loss = {}, None
        self.optimizer.zero_grad(set_to_none=True)

    def _capture(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self._graph_switches = self.exposure.dense_switches if self.exposure is not None else 0
        self.graph_captures.append(self.steps_taken - 1)
        self.optimizer.zero_grad(set_to_none=True)  # gradients are then allocated in the graph's pool
        self._static_batch = {name: t.clone() for name, t in batch.items()}
        graph = torch.cuda.CUDAGraph()
        with causal_mask_under_capture(), torch.cuda.graph(graph):  # sdpa keeps its causal flash kernel
            self._static_loss = self._forward_backward(self._static_batch)
        graph.replay()  # capture records the work without running it
        self._graph = graph
        return self._static_loss

    def describe(self) -> dict[str, Any]:
        """What this run used, for artifacts: weights, data, sparsity source, sizes, numerics."""
        info = {
            "weights": self.model.config.longexposure_weights,
            "data": self.batches.description,
            "sparsity_source": "none (dense)",
            "attn_implementation": self.model.config._attn_implementation,
            "trainable_params": sum(p.numel() for p in self.trainable),
            "total_params": sum(p.numel() for p in self.model.parameters()),
            "precision": self.setup.precision,
            "compiled": self.setup.compile,
            "cuda_graph": self.setup.cuda_graph,
            "data_parallel": None
            if self.dp is None
            else distributed.describe(self.dp, self.setup.data_parallel, self.setup.batch),
            "optimizer": f"AdamW ({'fused' if self.optimizer.defaults.get('fused') else 'for-each'})",
            "training_loss": self.setup.loss,
        }
        if self.setup.cuda_graph:
            info["graph_captures_at_steps"] = list(self.graph_captures)
        if self.setup.compile:
            from longexposure.compiled_model import dynamo_counters

            info.update(self.compiled, **dynamo_counters())
        if self.exposure is not None:
            info.update(self.exposure.report())
        narrowed = self.narrowed_mlp
        if narrowed is not None:
            dens = narrowed["mlp_density_per_layer"]
            mean = sum(dens) / len(dens)
            info["mlp_narrowed"] = (
                f"speed yardstick, not a method: each MLP cut to the neuron blocks (block {narrowed['block']}, "
                f"theta {narrowed['theta']}) that replay of {narrowed['profile']} keeps, as dense layers "
                f"(mean density {mean:.3f}); recorded, not predicted from this model"
            )
            info["mlp_block_density"] = mean
            if self.exposure is None:
                info["sparsity_source"] = f"MLP narrowed to replay of {narrowed['profile']} (dense layers)"
            info["mlp_density_per_layer"] = {str(i): d for i, d in enumerate(dens)}
        return info
