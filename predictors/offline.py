"""Offline predictor training (paper Sec. V-B): collect, train, calibrate, evaluate, save and load.

1. `collect`: run the frozen model on fine-tuning batches and keep, per layer, the predictor input
   (fc1's / q_proj's input) and the exposer's ground truth: per-token block activation count
   fraction and mass for the MLP, block attention mass for attention.
2. `train_mlp` / `train_attention`: Adam on the per-token (MLP) or per-sequence (attention) targets,
   with input-noise augmentation (x + noise * std(x) * N(0, 1): robustness to the drift that
   fine-tuning's trainable parameters cause) and a recall-weighted loss:
     MLP        weighted squared error on per-token count fraction and mass, the weight being
                `recall_weight` where the prediction is below the target (missing an active block
                costs more than computing an idle one), 1 elsewhere;
     attention  cross-entropy of the predicted block mass against the true one (a missed heavy block
                costs its whole mass).
3. `calibrate_*`: on held-back training batches, the largest `slack` (MLP) / smallest `tau_slack`
   (attention) reaching the recall / mass target, so deployment trades a little density for recall.
4. `evaluate_*`: per layer recall, precision, predicted and exposer density, mass kept, ms per call.
5. `PredictorBank`: one predictor per (layer, target), saved as `predictors.pt` then `predictors.json` (with
   the weights id it was trained for), loaded only onto those weights and only when complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from longexposure.predictors.builtin import build_predictor
from longexposure.predictors.lowrank import AttnLowRank, MlpLowRank, MlpPredictor, PredictorConfig, PredictorError
from torch import Tensor, nn

from longexposure.exposers import ThresholdMlp, attention_block_mass, attention_density, attention_mass_kept
from longexposure.measure import time_fn
from longexposure.paths import write_atomic, write_text_atomic
from longexposure.profiling import capture, decoder_layers, layer_part, num_heads
from longexposure.registry import PREDICTORS

FORMAT_VERSION = 2  # 2: the weights id and the tensor file's digest in the JSON


# ============================================================================================ collect
@dataclass
class LayerData:
    """One layer's training pairs; the leading dim is the batch unit (one operator call's batch).

    mlp_x (U, B, S, d); mlp_frac, mlp_mass (U, B, S, n_blocks): per-token block count fraction / mass.
    attn_x (U, B, S, d); attn_mass (U, B, H, N, N): block attention mass.
    """

    mlp_x: Tensor | None = None
    mlp_frac: Tensor | None = None
    mlp_mass: Tensor | None = None
    attn_x: Tensor | None = None
    attn_mass: Tensor | None = None

    def units(self) -> int:
        t = self.mlp_x if self.mlp_x is not None else self.attn_x
        return 0 if t is None else t.shape[0]

    def split(self, n: int) -> tuple[LayerData, LayerData]:
        """(first n units, the rest)."""
        head = {k: (v[:n] if v is not None else None) for k, v in vars(self).items()}
        tail = {k: (v[n:] if v is not None else None) for k, v in vars(self).items()}
        return LayerData(**head), LayerData(**tail)


@torch.no_grad()
def mlp_block_stats(act: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """Per token and neuron block of the ReLU outputs `act` (..., ffn): the fraction of the block's neurons
    that fire, and the block's activation mass (the MLP predictors' two targets)."""
    ffn = act.shape[-1]
    if ffn % block_size:
        raise PredictorError(f"ffn dim {ffn} is not divisible by block_size {block_size}")
    blocks = act.view(*act.shape[:-1], ffn // block_size, block_size)
    # a count of the firing neurons over the block size: the mean of (blocks > 0) as floats, without that float
    # copy of the activations (on a refresh's GPU, 128 MB per layer of 4096 x 8192)
    return (blocks > 0).sum(-1, dtype=torch.float32) / block_size, blocks.sum(-1, dtype=torch.float32)


def collect(
    model: nn.Module,
    batches: Sequence[Tensor],
    *,
    block_size: int = 64,
    attn_block: int = 64,
    mlp: bool = True,
    attention: bool = True,
    store_dtype: torch.dtype = torch.float32,
) -> list[LayerData]:
    """Run the frozen model on each (B, S) id batch; per layer, stack the inputs and exposer targets."""
    per_layer: list[dict[str, list[Tensor]]] = [dict() for _ in decoder_layers(model)]
    for ids in batches:
        for li, cap in enumerate(capture(model, ids, mlp=mlp, attention=attention)):
            store = per_layer[li]
            if mlp:
                frac, mass = mlp_block_stats(cap.mlp_act, block_size)
                store.setdefault("mlp_x", []).append(cap.mlp_in.to(store_dtype))
                store.setdefault("mlp_frac", []).append(frac.to(store_dtype))
                store.setdefault("mlp_mass", []).append(mass.to(store_dtype))
            if attention:
                store.setdefault("attn_x", []).append(cap.attn_in.to(store_dtype))
                store.setdefault("attn_mass", []).append(attention_block_mass(cap.q, cap.k, attn_block))
    return [LayerData(**{k: torch.stack(v) for k, v in store.items()}) for store in per_layer]


def _noisy(x: Tensor, noise: float, gen: torch.Generator) -> Tensor:
    if noise <= 0:
        return x
    eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return x + noise * x.std() * eps


def _lr(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


# ================================================================================================ MLP
def train_mlp(
    pred: MlpLowRank,
    data: LayerData,
    *,
    steps: int = 500,
    tokens_per_step: int = 4096,
    lr: float = 3e-3,
    noise: float = 0.05,
    recall_weight: float = 2.0,
    seed: int = 0,
) -> list[float]:
    """Fit per-token block (count fraction, mass); returns the loss every 50 steps.

    The readable one-predictor reference; `train_mlp_group` runs the same steps for several at once."""
    x = data.mlp_x.flatten(0, 2)  # (T, d)
    frac, mass = data.mlp_frac.flatten(0, 2).float(), data.mlp_mass.flatten(0, 2).float()
    with torch.no_grad():
        pred.in_scale.fill_(float(x.float().std()))
        pred.mass_scale.fill_(float(mass.mean().clamp_min(1e-6)))
    scale = float(pred.mass_scale)
    gen = torch.Generator(device=x.device).manual_seed(seed)
    optim = torch.optim.Adam(pred.parameters(), lr=lr)
    losses = []
    pred.train()
    for step in range(steps):
        for g in optim.param_groups:
            g["lr"] = _lr(step, steps, lr)
        idx = torch.randint(0, x.shape[0], (min(tokens_per_step, x.shape[0]),), generator=gen, device=x.device)
        xb = _noisy(x[idx].float(), noise, gen)
        c_logit, m_raw = pred.raw(xb)
        p = torch.sigmoid(c_logit.float())
        m = F.softplus(m_raw.float())
        yf, ym = frac[idx], mass[idx] / scale
        wf = torch.where(p < yf, recall_weight, 1.0)
        wm = torch.where(m < ym, recall_weight, 1.0)
        loss = (wf * (p - yf) ** 2).mean() + (wm * (m - ym) ** 2).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(float(loss.detach()))
    pred.eval()
    return losses


def _stacked_mlp_params(preds: Sequence[MlpLowRank], trainable: bool = True) -> list[tuple[Tensor, list[Tensor]]]:
    """Each parameter of the predictors, stacked over them: [((L, ...) copy, [per-predictor tensor])]."""
    names = [n for n, _ in preds[0].named_parameters()]  # inp.weight, inp.bias (rank > 0), out.weight, out.bias
    own = [dict(p.named_parameters()) for p in preds]
    return [(torch.stack([o[n].detach() for o in own]).requires_grad_(trainable), [o[n] for o in own]) for n in names]


def train_mlp_group(
    preds: Sequence[MlpLowRank],
    data: Sequence[LayerData],
    *,
    steps: int = 500,
    tokens_per_step: int = 4096,
    lr: float = 3e-3,
    noise: float = 0.05,
    recall_weight: float = 2.0,
    seeds: Sequence[int] | int = 0,
    matmul_dtype: torch.dtype | None = None,
    graph: bool | None = None,
    keep: dict | None = None,
) -> Tensor:
    """`train_mlp` for L predictors of one shape at once, predictor l on `data[l]`, with `seeds[l]`.

    The same steps as `train_mlp` per predictor (token draws, noise, loss, Adam, schedule), with the L
    predictors' parameters stacked into (L, ...) tensors and batched matmuls: one optimizer step updates
    every predictor; the loss is the sum of the per-predictor losses, so each predictor's gradient is
    its own. Predictors with the same seed (and token count) draw the same tokens and noise, as
    `train_mlp` with that seed would, so those draws are made once. The trained values are copied back
    into each predictor's own parameters and scale buffers in place (their tensors stay the same: a
    captured CUDA graph that reads them stays valid); nothing is read on the host.

    Args:
        preds: MlpLowRank predictors of the same rank, shapes, dtype and device.
        data: per predictor, a LayerData with the same number of tokens (U * B * S) each.
        seeds: per predictor (or one for all), the seed `train_mlp` would get.
        matmul_dtype: None: `train_mlp`'s arithmetic (the input in float32, divided by `in_scale`, the
            parameters' dtype in the matmuls). bf16 / fp16: the matmuls take their operands in this dtype
            (the tokens, the noise, `W_in / in_scale`, the hidden units, W_out) and accumulate in fp32, as
            under autocast; parameters, Adam and the loss stay fp32. The input layer (tokens x d x rank)
            is by far the largest matmul, and the stored inputs are bf16 anyway (a refresh's on a GPU).
        graph: run the steps after the first `_GRAPH_WARMUP` as replays of one captured CUDA graph (the
            same step: its draws advance the generators on every replay; Adam is capturable and reads its
            learning rate from the device). Eagerly each step is some 60 small kernels, host-bound on a
            GPU; None: on CUDA when there are more steps than warm-up ones.
        keep: with `graph`, a dict to keep the captured step in (`_KeptRun`) and to take it from on a later
            call of the same shapes, options and seeds' layout: that call copies its data, parameters and
            scales into the captured tensors, zeroes Adam's state and reseeds the generators in place, then
            replays every step. The same steps as a fresh call, without its eager warm-up steps and capture
            (a predictor refresh repeats one such call every N training steps); the kept graph holds its
            memory pool between calls.

    Returns:
        (logged steps, L) device tensor: each predictor's loss every 50 steps and at the last step.
    """
    if not preds or len(preds) != len(data):
        raise PredictorError(f"train_mlp_group needs one LayerData per predictor, got {len(preds)} and {len(data)}")
    seeds = [seeds] * len(preds) if isinstance(seeds, int) else list(seeds)
    ref = preds[0]
    shape = lambda p: (type(p), p.config.rank, p.d_model, p.n_blocks, p.out.weight.dtype, p.out.weight.device)  # noqa: E731
    tokens = {d.mlp_x.shape[:3].numel() for d in data}
    if any(shape(p) != shape(ref) for p in preds) or len(tokens) != 1 or len(seeds) != len(preds):
        raise PredictorError(
            "train_mlp_group trains predictors of one rank, shape, dtype and device on as many tokens each, "
            f"with one seed each; got {[shape(p)[1:] for p in preds]}, tokens {sorted(tokens)}, {len(seeds)} seeds"
        )
    n_pred, n_blocks, device = len(preds), ref.n_blocks, ref.out.weight.device
    with torch.no_grad():
        # on a GPU token-major (T, L, ...): a step's token draw is one gather of contiguous (L, ...) rows, seen
        # as (L, n, ...); on a CPU predictor-major (L, T, ...): the gather gives (L, n, ...) with no copy after
        tdim = 0 if device.type == "cuda" else 1
        x = torch.stack([d.mlp_x.flatten(0, 2) for d in data], 1 - tdim)  # as stored
        frac = torch.stack([d.mlp_frac.flatten(0, 2).float() for d in data], 1 - tdim)  # (..., n_blocks)
        mass = torch.stack([d.mlp_mass.flatten(0, 2).float() for d in data], 1 - tdim)
        # per token and predictor, sum and sum of squares of x, accumulated in fp32 from x as stored: the batches'
        # std from n gathered values each, and (low-precision matmuls) each predictor's input scale from all
        sums = _token_moments(x) if matmul_dtype else None
        if sums is None:
            in_scale = torch.stack([x.select(1 - tdim, i).float().std() for i in range(n_pred)])  # as in train_mlp
        else:
            s1, s2 = sums.sum(tdim).unbind(-1)  # (L,) float64
            in_scale = _std_from_moments(s1, s2, sums.shape[tdim] * x.shape[-1])
        mass_scale = torch.stack([mass.select(1 - tdim, i).mean().clamp_min(1e-6) for i in range(n_pred)])
        for p, s, m in zip(preds, in_scale, mass_scale, strict=True):
            p.in_scale.copy_(s)
            p.mass_scale.copy_(m)
        per_pred = mass_scale.view(-1, 1) if tdim == 0 else mass_scale.view(-1, 1, 1)
        target = torch.cat([frac, mass / per_pred], -1)  # count fraction and scaled mass: the outputs' targets
        del frac, mass
    graph = device.type == "cuda" and steps > _GRAPH_WARMUP if graph is None else graph
    slots = list(dict.fromkeys(seeds))  # one generator per distinct seed, in first-use order
    key = (
        type(ref), ref.config.rank, n_pred, n_blocks, x.shape, x.dtype, device, steps, tokens_per_step, lr, noise,
        recall_weight, matmul_dtype, tuple(slots.index(s) for s in seeds),
    )  # fmt: skip
    kept = keep.get(key) if keep is not None and graph else None
    if kept is not None:
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            losses = kept.rerun(preds, x, target, sums, in_scale, slots)
        for p in preds:
            p.eval()
        return torch.stack(losses) if losses else torch.empty(0, n_pred, device=device)
    stacked = _stacked_mlp_params(preds)
    weights = [s for s, _ in stacked]
    total, width = x.shape[tdim], x.shape[-1]
    n = min(tokens_per_step, total)
    gens = {s: torch.Generator(device=device).manual_seed(s) for s in dict.fromkeys(seeds)}
    rows = torch.arange(n_pred, device=device)[:, None]  # with per-predictor token ids (L, n)
    in_div = in_scale[:, None, None]
    low = matmul_dtype or torch.float32  # the noise's dtype: the first matmul's operands
    optim = torch.optim.Adam(weights, lr=lr, capturable=graph)
    lr_now = torch.full((), float(lr), device=device)
    if graph:  # a captured step reads its learning rate from the device (set after the constructor, whose
        optim.param_groups[0]["lr"] = lr_now  # range check would read a device lr on the host)

    def set_lr(step: int) -> None:
        if graph:
            lr_now.fill_(_lr(step, steps, lr))
        else:
            optim.param_groups[0]["lr"] = _lr(step, steps, lr)

    def one_step() -> Tensor:
        """Draws, forward, loss, backward, optimizer step; the (L,) loss."""
        draws = {}
        for s, gen in gens.items():  # train_mlp's order: the token ids, then the noise
            idx = torch.randint(0, total, (n,), generator=gen, device=device)
            eps = torch.randn((n, width), generator=gen, device=device, dtype=low) if noise > 0 else None
            draws[s] = (idx, eps)
        if len(gens) == 1:  # one draw for all
            idx, eps = draws[seeds[0]]
            pick = lambda t: t.index_select(tdim, idx).transpose(0, 1 - tdim)  # noqa: E731  (L, n, ...)
        else:
            idx = torch.stack([draws[s][0] for s in seeds])  # (L, n)
            eps = torch.stack([draws[s][1] for s in seeds]) if noise > 0 else None
            pick = lambda t: t[idx, rows] if tdim == 0 else t[rows, idx]  # noqa: E731
        xb, y = pick(x), pick(target)
        if matmul_dtype is None or noise <= 0:
            o = _group_forward(xb, eps, noise, weights, in_div, ref.config.rank, matmul_dtype)
        else:
            s1, s2 = pick(sums).sum(1).unbind(-1)  # (L,) over the batch's n tokens
            std = _std_from_moments(s1, s2, n * width)
            o = _group_forward(xb, eps, noise, weights, in_div, ref.config.rank, matmul_dtype, std=std)
        # train_mlp's loss, count and mass halves side by side: mean_f + mean_m = 2 * mean over both
        out = torch.cat([torch.sigmoid(o[..., :n_blocks].float()), F.softplus(o[..., n_blocks:].float())], -1)
        err = out - y
        loss = 2 * (torch.where(err < 0, recall_weight, 1.0) * err.square()).mean((1, 2))  # (L,)
        loss.sum().backward()
        optim.step()
        return loss.detach()

    logged = [step for step in range(steps) if step % 50 == 0 or step == steps - 1]
    with torch.enable_grad(), torch.autocast(device.type, enabled=False):
        generators = list(gens.values())
        if graph:
            losses, captured, loss = _replayed_steps(one_step, set_lr, optim, steps, logged, generators, device)
            if keep is not None and captured is not None:
                keep[key] = _KeptRun(captured, loss, x, target, sums, in_scale, weights, optim, generators, set_lr,
                                     steps, logged, device)  # fmt: skip
        else:
            losses = _eager_steps(one_step, set_lr, optim, steps, logged, generators, device)
    _copy_back(stacked)
    for p in preds:
        p.eval()
    return torch.stack(losses) if losses else torch.empty(0, n_pred, device=device)


def _token_moments(x: Tensor) -> Tensor:
    """(..., d) -> (..., 2) float64: each row's sum and sum of squares, accumulated in fp32 from x as stored (no fp32
    copy of x: a refresh's pool is 8 layers x 8192 tokens x 2048, 268 MB in bf16)."""
    s1 = x.sum(-1, dtype=torch.float32)
    s2 = torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).square()
    return torch.stack([s1, s2], -1).double()


def _std_from_moments(s1: Tensor, s2: Tensor, count: int) -> Tensor:
    """The sample std (float32) of `count` values from their float64 sum and sum of squares."""
    return ((s2 - s1 * s1 / count) / (count - 1)).clamp_min(0).sqrt().float()


def _copy_back(stacked: list[tuple[Tensor, list[Tensor]]]) -> None:
    """The trained (L, ...) values into each predictor's own tensors, in place."""
    with torch.no_grad():
        for trained, own in stacked:
            for layer, tensor in enumerate(own):
                tensor.copy_(trained[layer])


_GRAPH_WARMUP = 2  # eager steps before a capture: Adam's state and the matmul workspaces exist by then


_StepFn = Callable[[], Tensor]


def _eager_steps(
    one_step: _StepFn,
    set_lr: Callable[[int], None],
    optim: torch.optim.Optimizer,
    steps: int,
    logged: list[int],
    generators: list[torch.Generator],
    device: torch.device,
) -> list[Tensor]:
    """Run `steps` training steps; the losses of the `logged` ones."""
    losses = []
    for step in range(steps):
        set_lr(step)
        optim.zero_grad(set_to_none=True)
        loss = one_step()
        if step in logged:
            losses.append(loss)
    return losses


def _replayed_steps(
    one_step: _StepFn,
    set_lr: Callable[[int], None],
    optim: torch.optim.Optimizer,
    steps: int,
    logged: list[int],
    generators: list[torch.Generator],
    device: torch.device,
) -> tuple[list[Tensor], torch.cuda.CUDAGraph | None, Tensor | None]:
    """`_eager_steps` with the steps after the warm-up replayed from one captured CUDA graph, on a side stream
    (a capture may not run on the default stream), joined back before returning. No host sync. Returns the
    logged losses, the graph (None when no step was left after the warm-up) and its loss tensor."""
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)
    losses = []
    graph, loss = None, None
    with torch.cuda.stream(side):
        warm = min(_GRAPH_WARMUP, steps)
        losses += _eager_steps(one_step, set_lr, optim, warm, logged, generators, device)
        if steps > warm:
            optim.zero_grad(set_to_none=True)  # the capture's backward allocates the gradients in its own pool
            graph = torch.cuda.CUDAGraph()
            for gen in generators:
                graph.register_generator_state(gen)  # each replay draws new tokens and noise
            graph.capture_begin()
            loss = one_step()
            graph.capture_end()
            losses += _replay(graph, loss, set_lr, range(warm, steps), logged)
    main.wait_stream(side)
    return losses, graph, loss


def _replay(graph: torch.cuda.CUDAGraph, loss: Tensor, set_lr: Callable[[int], None], steps: range,
            logged: list[int]) -> list[Tensor]:  # fmt: skip
    """Replay the captured step once per step of `steps` (its learning rate set first); the logged losses."""
    losses = []
    for step in steps:
        set_lr(step)
        graph.replay()
        if step in logged:
            losses.append(loss.clone())
    return losses


@dataclass
class _KeptRun:
    """A captured `train_mlp_group` step with the tensors it reads, for `keep`: rerun it on new data."""

    graph: torch.cuda.CUDAGraph
    loss: Tensor
    x: Tensor
    target: Tensor
    sums: Tensor | None
    in_scale: Tensor
    weights: list[Tensor]
    optim: torch.optim.Optimizer
    generators: list[torch.Generator]
    set_lr: Callable[[int], None]
    steps: int
    logged: list[int]
    device: torch.device

    def rerun(self, preds: Sequence[MlpLowRank], x: Tensor, target: Tensor, sums: Tensor | None, in_scale: Tensor,
              seeds: list[int]) -> list[Tensor]:  # fmt: skip
        """A fresh call's steps on new data: everything the graph reads reset in place, every step replayed; the
        trained values copied back into `preds`. Returns the logged losses."""
        stacked = _stacked_mlp_params(preds)
        with torch.no_grad():
            for static, new in ((self.x, x), (self.target, target), (self.in_scale, in_scale), (self.sums, sums)):
                if static is not None:
                    static.copy_(new)
            for trained, (values, _) in zip(self.weights, stacked, strict=True):
                trained.copy_(values)
            for state in self.optim.state.values():  # a new Adam: no moments, step 0
                for value in state.values():
                    if isinstance(value, Tensor):
                        value.zero_()
        for gen, seed in zip(self.generators, seeds, strict=True):
            gen.manual_seed(seed)  # a generator registered with the graph: replays draw from its new seed
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            losses = _replay(self.graph, self.loss, self.set_lr, range(self.steps), self.logged)
        main.wait_stream(side)
        _copy_back([(trained, own) for trained, (_, own) in zip(self.weights, stacked, strict=True)])
        return losses


def _group_forward(
    xb: Tensor,
    eps: Tensor | None,
    noise: float,
    weights: list[Tensor],
    in_div: Tensor,
    rank: int,
    low: torch.dtype | None,
    std: Tensor | None = None,
) -> Tensor:
    """`MlpLowRank.raw` of L stacked predictors on their noisy token batches -> (L, n, 2 * n_blocks) logits.

    xb (L, n, d) clean tokens; eps (n, d) noise shared by all, or (L, n, d); the input x + noise * std(x) * eps.
    `low` None: `train_mlp`'s arithmetic. Else the matmuls take `low` operands (fp32 accumulation, as under
    autocast), the input scale is folded into W_in ((x / s) W^T = x (W / s)^T) and the noise goes through
    W_in on its own ((x + c eps) W^T = x W^T + c (eps W^T): a shared eps is one matmul for all predictors,
    instead of a pass over the (L, n, d) batch), with `std` (L,) the batches' std computed by the caller.
    """
    w_out, b_out = weights[-2], weights[-1]
    if low is None:
        # the gathered rows (a transposed view of a fresh tensor) made contiguous, then changed in place: on a
        # CPU, strided reductions and fresh (L, n, d) temporaries (page faults) cost more than the arithmetic
        xb = xb.float().contiguous()
        if noise > 0:  # each batch's std as train_mlp takes it (one reduction per predictor: ~7x faster on a CPU
            std = torch.stack([t.std() for t in xb])[:, None, None]  # than std(dim=(1, 2)))
            xb.addcmul_(eps, noise * std)
        h = xb.to(w_out.dtype).div_(in_div.to(w_out.dtype))
        if rank > 0:
            h = F.relu(torch.baddbmm(weights[1][:, None, :], h, weights[0].transpose(1, 2)))
        return torch.baddbmm(b_out[:, None, :], h, w_out.transpose(1, 2))
    w_first, b_first = (weights[0], weights[1]) if rank > 0 else (w_out, b_out)
    w_first = (w_first / in_div).to(low)  # (L, hidden, d)
    h = torch.baddbmm(b_first.to(low)[:, None, :], xb.to(low), w_first.transpose(1, 2))
    if noise > 0:
        if eps.dim() == 2:  # (n, d) (d, L * hidden): one matmul
            proj = (eps @ w_first.flatten(0, 1).T).view(eps.shape[0], *w_first.shape[:2]).transpose(0, 1)
        else:
            proj = torch.bmm(eps, w_first.transpose(1, 2))
        h = torch.addcmul(h, proj, (noise * std).to(low)[:, None, None])
    if rank == 0:
        return h.float()
    return torch.baddbmm(b_out.to(low)[:, None, :], F.relu(h), w_out.to(low).transpose(1, 2)).float()


def mlp_truth(data: LayerData, u: int, policy: ThresholdMlp) -> tuple[Tensor, Tensor]:
    """(exposer block mask, true block mass) of batch unit u."""
    count = data.mlp_frac[u].float().sum((0, 1)) * policy.block_size
    mass = data.mlp_mass[u].float().sum((0, 1))
    return policy.mask_from_stats(count, mass), mass


MLP_METRICS = ("recall", "precision", "density", "exposer_density", "mass_kept", "exposer_mass_kept")


def threshold_masks(count: Tensor, mass: Tensor, policy: ThresholdMlp, scales: Tensor) -> Tensor:
    """`policy.mask_from_stats(count, mass, theta=policy.theta * s)` for every s in `scales` at once.

    count, mass (..., n_blocks); scales (..., K) float32 (as a predictor's `theta_scale`), its leading dims
    broadcast with count's -> (..., K, n_blocks) bool. One comparison against all the thresholds, with the
    rounding of one call per scale (the same importance, peak and theta x peak), so the same masks."""
    c = count / count.amax(-1, keepdim=True).clamp_min(1e-12)  # `block_importance`, per row
    m = mass / mass.amax(-1, keepdim=True).clamp_min(1e-12)
    imp = policy.alpha * c + (1.0 - policy.alpha) * m
    theta = policy.theta * scales
    peak = imp.amax(-1, keepdim=True)
    keep = (imp[..., None, :] >= theta[..., :, None] * peak[..., None, :]) & (count > 0)[..., None, :]
    k = min(policy.min_blocks, imp.shape[-1])
    if k > 0:
        top = imp.topk(k, dim=-1).indices[..., None, :]
        keep.scatter_(-1, top.expand(*keep.shape[:-1], k), True)
    return keep


def _unit_mean(per_unit: Tensor) -> Tensor:
    """Mean over dim -2 (batch units), added in unit order: the float64 rounding of the per-unit loop's
    `sum(rows) / len(rows)`, so a recall exactly at a target compares the same way."""
    acc = per_unit[..., 0, :]
    for u in range(1, per_unit.shape[-2]):
        acc = acc + per_unit[..., u, :]
    return acc / per_unit.shape[-2]


def mask_metrics(got: Tensor, truth: Tensor, mass: Tensor) -> Tensor:
    """`MLP_METRICS` of predicted block masks, as float64 on the device, means over batch units.

    got (..., U, n_blocks) bool; truth (U, n_blocks) bool (the exposer's) and mass (U, n_blocks) the true
    block mass, or with leading dims that broadcast to got's -> (..., len(MLP_METRICS)). recall =
    |got & truth| / max(1, |truth|), precision likewise over |got|; densities are kept fractions; mass kept
    is the true mass inside the kept blocks over all of it.
    """
    got, truth, mass = got.to(truth.device), truth.expand_as(got), mass.expand(got.shape)
    hit = (got & truth).sum(-1).double()
    total = mass.sum(-1).clamp_min(1e-12)
    per_unit = torch.stack(
        [
            hit / truth.sum(-1).clamp_min(1).double(),
            hit / got.sum(-1).clamp_min(1).double(),
            got.float().mean(-1).double(),
            truth.float().mean(-1).double(),
            (mass.where(got, 0.0).sum(-1) / total).double(),
            (mass.where(truth, 0.0).sum(-1) / total).double(),
        ],
        -1,
    )  # (..., U, metrics)
    return _unit_mean(per_unit)


@torch.no_grad()
def mlp_slack_metrics(pred: MlpPredictor, data: LayerData, slacks: Tensor) -> Tensor:
    """`evaluate_mlp(pred, data, pred.config)`'s metrics (no timing) with the predictor's threshold at each of
    `slacks` (K,) float32 in place of its `theta_scale`: (K, len(MLP_METRICS)) float64 on the device.

    The predicted block sums are computed once per batch unit, the K masks in one comparison; no host sync,
    and the predictor is left as it was."""
    return stacked_slack_metrics([pred], [data], slacks[None])[0]


@torch.no_grad()
def stacked_slack_metrics(
    preds: Sequence[MlpPredictor], data: Sequence[LayerData], scales: Tensor, *, matmul_dtype: torch.dtype | None = None
) -> Tensor:
    """`mlp_slack_metrics` of L predictors (layers) at once, predictor l on `data[l]` at its own `scales[l]`.

    Args:
        preds: predictors with one threshold policy (theta, alpha, min_blocks, block size) and n_blocks.
        data: as many units each.
        scales: (L, K) float32 theta multipliers.
        matmul_dtype: None: each predictor's own forward per unit (its arithmetic off autocast). bf16 / fp16 (a
            refresh's on a GPU, for MLP inputs in that dtype): mlp-lowrank predictors of one shape run as one
            batched forward with matmuls in this dtype (fp32 accumulation, as the fine-tuning step's autocast
            runs them), and the true stats of all layers reduce together: some 20 kernels for all layers where
            the loop launches ~25 per layer and unit (host-bound on a GPU: 6.9 ms of an H100 refresh, 6d36208).

    Returns:
        (L, K, len(MLP_METRICS)) float64 on the device; per predictor one forward per unit, then one batched
        comparison and one metric computation for all.
    """
    keys = [(p.config.exposer(), p.n_blocks, d.units()) for p, d in zip(preds, data, strict=True)]
    if any(k != keys[0] for k in keys):
        raise PredictorError(f"stacked_slack_metrics needs one threshold policy, n_blocks and unit count: {keys}")
    policy = keys[0][0]
    if matmul_dtype is not None:
        count, pmass = group_block_sums(preds, [d.mlp_x for d in data], matmul_dtype)  # (L, U, n_blocks)
        frac = torch.stack([d.mlp_frac.flatten(1, 2) for d in data])  # (L, U, tokens, n_blocks)
        mass = torch.stack([d.mlp_mass.flatten(1, 2) for d in data]).sum(2, dtype=torch.float32)
        ones = torch.ones(1, device=frac.device)
        truth = threshold_masks(frac.sum(2, dtype=torch.float32) * policy.block_size, mass, policy, ones)[..., 0, :]
        got = threshold_masks(count.to(mass.device), pmass.to(mass.device), policy, scales.to(mass.device)[:, None, :])
        return mask_metrics(got.transpose(1, 2), truth[:, None], mass[:, None])
    truth, mass, count, pmass = [], [], [], []
    for pred, d in zip(preds, data, strict=True):
        for u in range(d.units()):
            t, m = mlp_truth(d, u, policy)
            c, pm = pred.block_sums(d.mlp_x[u])
            truth.append(t)
            mass.append(m)
            count.append(c.to(m.device))
            pmass.append(pm.to(m.device))
    rows = lambda ts: torch.stack(ts).view(len(preds), data[0].units(), -1)  # noqa: E731  (L, U, n_blocks)
    got = threshold_masks(rows(count), rows(pmass), policy, scales.to(mass[0].device)[:, None, :])  # (L, U, K, nb)
    return mask_metrics(got.transpose(1, 2), rows(truth)[:, None], rows(mass)[:, None])


def group_block_sums(
    preds: Sequence[MlpPredictor], xs: Sequence[Tensor], matmul_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """`block_sums` of L mlp-lowrank predictors of one shape, predictor l on each unit of xs[l] (U, B, S, d), as one
    batched forward with `matmul_dtype` operands (`_group_forward`'s arithmetic): (L, U, n_blocks) count and mass."""
    ref = preds[0]
    shape = lambda p: (type(p), p.config.rank, p.d_model, p.n_blocks, p.config.block_size)  # noqa: E731
    if not isinstance(ref, MlpLowRank) or any(shape(p) != shape(ref) for p in preds):
        got = [shape(p) for p in preds]
        raise PredictorError(f"group_block_sums needs mlp-lowrank predictors of one shape, got {got}")
    units = xs[0].shape[0]
    x = torch.stack([t.flatten(1, 2) for t in xs]).flatten(0, 1)  # (L * U, tokens, d)
    per_unit = lambda t: t.repeat_interleave(units, 0)  # noqa: E731  (L, ...) -> (L * U, ...)
    weights = [per_unit(w) for w, _ in _stacked_mlp_params(preds, trainable=False)]
    in_div = per_unit(torch.stack([p.in_scale for p in preds]))[:, None, None]
    o = _group_forward(x, None, 0.0, weights, in_div, ref.config.rank, matmul_dtype)  # (L * U, tokens, 2 * nb)
    nb = ref.n_blocks
    mass_scale = per_unit(torch.stack([p.mass_scale for p in preds]))[:, None, None]
    count = torch.sigmoid(o[..., :nb]).sum(1) * ref.config.block_size
    mass = (F.softplus(o[..., nb:]) * mass_scale).sum(1)
    return count.view(len(preds), units, nb), mass.view(len(preds), units, nb)


def first_reaching(scores: Tensor, target: float) -> Tensor:
    """Index (int64, on the device) of the first of `scores` (..., K) that reaches `target`, else K - 1."""
    leading_misses = ((scores >= target).cumsum(-1) == 0).sum(-1)
    return leading_misses.clamp_max(scores.shape[-1] - 1)


@functools.lru_cache(maxsize=64)
def slack_tensor(grid: tuple[float, ...], device: torch.device) -> Tensor:
    """The grid as a float32 tensor on `device` (as `theta_scale` holds a slack), made once per device:
    building it is a host-to-device copy, which waits for the device."""
    return torch.tensor(grid, dtype=torch.float32, device=device)


@torch.no_grad()
def evaluate_mlp(
    pred: nn.Module, data: LayerData, config: PredictorConfig, *, time_it: bool = True
) -> dict[str, float]:
    """Mean over batch units: recall / precision vs. the exposer, densities, activation mass kept, ms per call.

    Computed on the device and read back once."""
    policy = config.exposer()
    truth, mass = zip(*(mlp_truth(data, u, policy) for u in range(data.units())), strict=True)
    got = torch.stack([pred.block_mask(data.mlp_x[u]) for u in range(data.units())])
    out = dict(zip(MLP_METRICS, mask_metrics(got, torch.stack(truth), torch.stack(mass)).tolist(), strict=True))
    if time_it:
        x = data.mlp_x[0]
        out["ms_per_call"] = time_fn(lambda: pred(x), x.device, warmup=2, reps=5).p50
    return out


def _calibrate(pred: nn.Module, field: str, grid: Sequence[float], score: Callable[[], float], target: float) -> float:
    """Set `pred.config.<field>` to the first grid value whose score reaches `target` (else the last)."""
    sync = getattr(pred, "sync_config", lambda: None)  # predictors that keep config values on the device
    chosen = grid[-1]
    for value in grid:
        setattr(pred.config, field, value)
        sync()
        if score() >= target:
            chosen = value
            break
    setattr(pred.config, field, chosen)
    sync()
    return chosen


@torch.no_grad()
def calibrate_mlp(
    pred: nn.Module,
    data: LayerData,
    recall_target: float = 0.97,
    grid: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3),
) -> float:
    """Set `pred.config.slack` to the largest grid value (the first, in grid order) whose mean recall on
    `data` reaches the target, else the last. For a threshold predictor (`MlpPredictor`) every grid value
    is scored at once (`mlp_slack_metrics`) with one host read; others are tried one by one."""
    if not isinstance(pred, MlpPredictor):
        score = lambda: evaluate_mlp(pred, data, pred.config, time_it=False)["recall"]  # noqa: E731
        return _calibrate(pred, "slack", grid, score, recall_target)
    if not grid:
        raise PredictorError("calibrate_mlp needs a non-empty slack grid")
    slacks = slack_tensor(tuple(float(v) for v in grid), pred.theta_scale.device)
    chosen = grid[int(first_reaching(mlp_slack_metrics(pred, data, slacks)[:, 0], recall_target))]  # the host read
    pred.config.slack = chosen
    pred.sync_config()
    return chosen


# ========================================================================================== attention
def _attn_loss(pred: AttnLowRank, x: Tensor, target: Tensor) -> Tensor:
    logits = pred.block_logits(x)
    logp = torch.log_softmax(logits, -1).masked_fill(torch.isinf(logits), 0.0)
    return -(target * logp).sum(-1).mean()


def train_attention(
    pred: AttnLowRank,
    data: LayerData,
    *,
    steps: int = 500,
    seqs_per_step: int = 8,
    lr: float = 3e-3,
    noise: float = 0.05,
    seed: int = 0,
) -> list[float]:
    """Fit predicted block mass to the true one (cross-entropy over key blocks); loss every 50 steps."""
    x = data.attn_x.flatten(0, 1)  # (U*B, S, d)
    target = data.attn_mass.flatten(0, 1)  # (U*B, H, N, N)
    with torch.no_grad():
        pred.in_scale.fill_(float(x.float().std()))
    gen = torch.Generator(device=x.device).manual_seed(seed)
    optim = torch.optim.Adam(pred.parameters(), lr=lr)
    losses = []
    pred.train()
    for step in range(steps):
        for g in optim.param_groups:
            g["lr"] = _lr(step, steps, lr)
        idx = torch.randint(0, x.shape[0], (min(seqs_per_step, x.shape[0]),), generator=gen, device=x.device)
        loss = _attn_loss(pred, _noisy(x[idx].float(), noise, gen), target[idx])
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if step % 50 == 0 or step == steps - 1:
            losses.append(float(loss.detach()))
    pred.eval()
    return losses


@torch.no_grad()
def evaluate_attention(
    pred: nn.Module, data: LayerData, config: PredictorConfig, *, time_it: bool = True
) -> dict[str, float]:
    """Mean over batch units: true attention mass kept by the predicted mask, densities, recall vs. exposer."""
    exposer = config.exposer()
    rows = []
    for u in range(data.units()):
        mass = data.attn_mass[u]
        truth = exposer.block_mask(mass)
        got = pred(data.attn_x[u]).to(mass.device)
        hit = (got & truth).sum().item()
        rows.append(
            {
                "recall": hit / max(1, truth.sum().item()),
                "precision": hit / max(1, got.sum().item()),
                "density": attention_density(got).mean().item(),
                "exposer_density": attention_density(truth).mean().item(),
                "mass_kept": attention_mass_kept(mass, got).mean().item(),
                "exposer_mass_kept": attention_mass_kept(mass, truth).mean().item(),
            }
        )
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    if time_it:
        x = data.attn_x[0]
        out["ms_per_call"] = time_fn(lambda: pred(x), x.device, warmup=2, reps=5).p50
    return out


@torch.no_grad()
def calibrate_attention(
    pred: nn.Module, data: LayerData, mass_target: float = 0.95, grid: Sequence[float] = (0.0, 0.01, 0.02, 0.03, 0.04)
) -> float:
    """Set `pred.config.tau_slack` to the smallest grid value whose mean true mass kept reaches the target."""
    score = lambda: evaluate_attention(pred, data, pred.config, time_it=False)["mass_kept"]  # noqa: E731
    return _calibrate(pred, "tau_slack", grid, score, mass_target)


# ============================================================================================== bank
BANK_JSON, BANK_TENSORS = "predictors.json", "predictors.pt"
_FINGERPRINT_SAMPLES = 16  # entries per weight matrix
_FINGERPRINT_RTOL, _FINGERPRINT_ATOL = 2e-2, 1e-6  # one bf16 step, and fp16's underflow


def _arch(model: nn.Module) -> dict[str, Any]:
    """The dims a bank's predictors are shaped by (checked key by key, so a mismatch names its key)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    return {
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "ffn_dim": getattr(cfg, "ffn_dim", None),
        "layers": len(decoder_layers(model)),
        "heads": num_heads(model),
    }


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> list[float]:
    """16 fixed entries of every layer's frozen fc1, q and k weights (what the predictors learned from),
    rounded to bf16: within rounding for the same weights in fp32, fp16 or bf16, on any device, wrapped in
    peft or not; different for another checkpoint, another random init or reordered neurons. One small copy."""
    samples = []
    for layer in decoder_layers(model):
        for part in ("fc1", "q", "k"):
            flat = layer_part(model, layer, part).weight.detach().reshape(-1)
            idx = (torch.arange(_FINGERPRINT_SAMPLES, device=flat.device) * 2654435761 + 97) % flat.numel()
            samples.append(flat[idx].to(torch.bfloat16))
    return [float(v) for v in torch.cat(samples).float().cpu()]


def _signs(fingerprint: list[float]) -> str:
    """The fingerprint's signs ('0' near zero): unlike its values, the same in every dtype."""
    return "".join("+" if v > _FINGERPRINT_ATOL else "-" if v < -_FINGERPRINT_ATOL else "0" for v in fingerprint)


def weights_id(model: nn.Module) -> dict[str, Any]:
    """What a bank is valid for.

    `id` (the weights id): a 12-hex digest of the model's dims (`_arch`) and the signs of its weights
    fingerprint (`weights_fingerprint`), the same for the same weights in any dtype or device, and
    different for other weights (one bit per sampled entry). `fingerprint`: the sampled values, which a
    load compares within bf16 rounding. `weights`: the description (checkpoint path or `random-init`),
    informational only: a moved checkpoint still matches, two random inits do not.
    """
    arch, fingerprint = _arch(model), weights_fingerprint(model)
    digest = hashlib.sha1(json.dumps({"arch": arch, "signs": _signs(fingerprint)}).encode()).hexdigest()[:12]
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    source = str(getattr(base.config, "longexposure_weights", "unknown"))
    return {**arch, "weights": source, "id": digest, "fingerprint": " ".join(f"{v:.4g}" for v in fingerprint)}


def _same_weights(saved: str, here: str) -> bool:
    """Two `weights_id` fingerprints agree within bf16 rounding (fp16 -> bf16 rounds twice: one bf16 step)."""
    try:
        a_values, b_values = [float(v) for v in saved.split()], [float(v) for v in here.split()]
    except (AttributeError, ValueError):
        return False
    if len(a_values) != len(b_values):
        return False
    tol = lambda a, b: _FINGERPRINT_RTOL * max(abs(a), abs(b)) + _FINGERPRINT_ATOL  # noqa: E731
    return all(abs(a - b) <= tol(a, b) for a, b in zip(a_values, b_values, strict=True))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class PredictorBank:
    """One predictor per (target, layer) of a model; saves and loads per model.

    On disk: `predictors.pt` (trained tensors, `{target}.{layer}` -> state dict) and `predictors.json`
    (names, per-layer configs, the model's `weights_id`, the tensor file's size and sha256). The JSON is
    written last and atomically, so a directory holding it holds a complete bank; `load` checks
    completeness, shapes and the weights id, and refuses what does not fit.

    Args:
        predictors: {"mlp": [per-layer module], "attention": [...]} (either may be absent).
        names: registry name per target.
    """

    def __init__(self, predictors: dict[str, list[nn.Module]], names: dict[str, str]):
        self.predictors, self.names = predictors, names

    @classmethod
    def build(
        cls,
        model: nn.Module,
        *,
        mlp: str | None = "mlp-lowrank",
        attention: str | None = "attn-lowrank",
        mlp_config: dict[str, Any] | None = None,
        attn_config: dict[str, Any] | None = None,
    ) -> PredictorBank:
        layers = len(decoder_layers(model))
        preds: dict[str, list[nn.Module]] = {}
        names: dict[str, str] = {}
        for target, name, opts in (("mlp", mlp, mlp_config), ("attention", attention, attn_config)):
            if name is None:
                continue
            opts = {**(opts or {}), "target": target}
            preds[target] = [build_predictor(name, model, i, PredictorConfig(**opts)) for i in range(layers)]
            names[target] = name
        return cls(preds, names)

    def __getitem__(self, key: tuple[str, int]) -> nn.Module:
        target, layer = key
        return self.predictors[target][layer]

    def save(self, directory: str | Path, model: nn.Module, report: dict[str, Any] | None = None) -> Path:
        """Write predictors.pt (trained weights), then predictors.json (names, per-layer configs, weights id,
        the tensor file's digest). An earlier bank's JSON goes first: an interrupted save is never complete."""
        directory = Path(directory)
        layers = len(decoder_layers(model))
        if not self.predictors:
            raise PredictorError("the bank holds no predictors: nothing to save")
        for target, preds in self.predictors.items():
            if len(preds) != layers:
                raise PredictorError(f"the bank has {target} predictors for {len(preds)} of {layers} layers")
        meta: dict[str, Any] = {"format": FORMAT_VERSION, "model": weights_id(model), "targets": {}}
        state: dict[str, Any] = {}
        for target, preds in self.predictors.items():
            name = self.names[target]
            meta["targets"][target] = {"name": name, "configs": [p.config.to_dict() for p in preds]}
            if PREDICTORS.entry(name).meta.get("trainable"):
                for i, p in enumerate(preds):
                    state[f"{target}.{i}"] = {k: v.detach().cpu() for k, v in p.state_dict().items()}
        if report is not None:
            meta["report"] = report
        directory.mkdir(parents=True, exist_ok=True)
        (directory / BANK_JSON).unlink(missing_ok=True)
        tensors = directory / BANK_TENSORS
        write_atomic(tensors, lambda f: torch.save(state, f))
        meta["tensors"] = {
            "file": BANK_TENSORS,
            "bytes": tensors.stat().st_size,
            "sha256": _sha256(tensors),
            "keys": sorted(state),
        }
        text = json.dumps(meta, indent=2) + "\n"
        write_text_atomic(directory / BANK_JSON, text)
        return directory

    @staticmethod
    def is_saved(directory: str | Path) -> bool:
        """True when `directory` holds a complete bank of the current format (what a cache may reuse)."""
        try:
            meta = json.loads((Path(directory) / BANK_JSON).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(meta, dict) and meta.get("format") == FORMAT_VERSION

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module) -> PredictorBank:
        """Rebuild the saved predictors for `model` and load their weights.

        Raises FileNotFoundError for a missing or interrupted bank, and PredictorError (a ValueError) for
        a bank of another format, shape or weights, or an incomplete or corrupt one; never loads part of one.
        """
        directory = Path(directory)
        meta_path = directory / BANK_JSON
        if not meta_path.exists():
            hint = (
                f" ({BANK_TENSORS} without {BANK_JSON}: an interrupted save; train the bank again)"
                if (directory / BANK_TENSORS).exists()
                else ""
            )
            raise FileNotFoundError(f"no saved predictors at {meta_path}{hint}")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise PredictorError(f"{meta_path} is not valid JSON ({exc})") from None
        if meta.get("format") != FORMAT_VERSION:
            raise PredictorError(
                f"{meta_path}: format {meta.get('format')}, this version reads format {FORMAT_VERSION} (format 1 "
                "records no weights id to check); train the bank again (longexposure train-predictors)"
            )
        saved = meta["model"]
        here = weights_id(model)
        for key in ("model_type", "hidden_size", "ffn_dim", "layers", "heads"):
            if saved.get(key) != here[key]:
                raise PredictorError(
                    f"{meta_path}: saved for {key}={saved.get(key)}, but this model has {key}={here[key]}"
                )
        if not _same_weights(saved.get("fingerprint", ""), here["fingerprint"]):
            same_id = saved.get("id") == here["id"]
            close = " (same signs, values beyond rounding: fine-tuned or rescaled?)" if same_id else ""
            raise PredictorError(
                f"{meta_path} was trained for other weights: the bank's weights id is {saved.get('id')} "
                f"({saved.get('weights')}), this model's is {here['id']} ({here['weights']}){close}; "
                "train predictors for this model (longexposure train-predictors)"
            )
        layers = here["layers"]
        if not meta.get("targets"):
            raise PredictorError(f"{meta_path} holds no predictors")
        state = cls._load_state(directory, meta)
        preds: dict[str, list[nn.Module]] = {}
        names: dict[str, str] = {}
        for target, spec in meta["targets"].items():
            configs = spec.get("configs", [])
            if len(configs) != layers:
                raise PredictorError(f"{meta_path}: {target} configs for {len(configs)} of the model's {layers} layers")
            trainable = bool(PREDICTORS.entry(spec["name"]).meta.get("trainable"))
            names[target] = spec["name"]
            preds[target] = []
            for i, cfg in enumerate(configs):
                try:
                    config = PredictorConfig(**cfg)
                except TypeError as exc:
                    raise PredictorError(f"{meta_path}: {target} layer {i}: bad config ({exc})") from None
                if config.target != target:
                    raise PredictorError(f"{meta_path}: {target} layer {i} holds a {config.target} config")
                p = build_predictor(spec["name"], model, i, config)
                key = f"{target}.{i}"
                if trainable:
                    if key not in state:
                        raise PredictorError(f"{meta_path}: no trained {target} weights for layer {i} ({key})")
                    _check_shapes(p, state.pop(key), f"{directory / BANK_TENSORS} [{key}]")
                preds[target].append(p.eval())
        if state:
            raise PredictorError(f"{directory / BANK_TENSORS} holds weights no saved predictor uses: {sorted(state)}")
        return cls(preds, names)

    @staticmethod
    def _load_state(directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """predictors.pt, checked against the size and digest the JSON recorded (tensors only: weights_only)."""
        path = directory / BANK_TENSORS
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the bank in {directory} is incomplete; train it again")
        want = meta.get("tensors", {})
        size = path.stat().st_size
        if size != want.get("bytes") or _sha256(path) != want.get("sha256"):
            raise PredictorError(
                f"{path} is not the file {BANK_JSON} was saved with ({size} bytes, {want.get('bytes')} expected): "
                "truncated or replaced; train the bank again"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign pickle: one clear error, not the unpickler's
            raise PredictorError(f"{path} cannot be read ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(state, dict):
            raise PredictorError(f"{path} holds a {type(state).__name__}, not a dict of state dicts")
        return state


def _check_shapes(pred: nn.Module, saved: Any, where: str) -> None:
    """Load `saved` into `pred`: the same keys and shapes as the predictor built for this model, or an error."""
    own = pred.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(own):
        got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise PredictorError(f"{where}: tensors {got}, expected {sorted(own)}")
    for k, v in own.items():
        if not isinstance(saved[k], Tensor) or tuple(saved[k].shape) != tuple(v.shape):
            raise PredictorError(
                f"{where}: {k} has shape {tuple(getattr(saved[k], 'shape', ()))}, this model needs {tuple(v.shape)}"
            )
    pred.load_state_dict(saved)


# ============================================================================================ driver
def train_bank(
    model: nn.Module,
    train_data: Sequence[LayerData],
    *,
    mlp: bool = True,
    attention: bool = True,
    mlp_config: dict[str, Any] | None = None,
    attn_config: dict[str, Any] | None = None,
    steps: int = 500,
    noise: float = 0.05,
    recall_weight: float = 2.0,
    recall_target: float = 0.97,
    mass_target: float = 0.95,
    calib_fraction: float = 0.2,
    seed: int = 0,
    log: Any = None,
) -> tuple[PredictorBank, dict[str, Any]]:
    """Train mlp-lowrank and attn-lowrank for every layer, then calibrate each on held-back units.

    `seed` fixes the predictors' initial weights and their training noise: the same data and seed give
    the same bank whatever the caller's RNG state (which is left as it was).
    """
    with torch.random.fork_rng(devices=[]):  # the modules are initialised on the CPU, then moved
        torch.manual_seed(seed)
        bank = PredictorBank.build(
            model,
            mlp="mlp-lowrank" if mlp else None,
            attention="attn-lowrank" if attention else None,
            mlp_config=mlp_config,
            attn_config=attn_config,
        )
    info: dict[str, Any] = {"layers": []}
    for li, data in enumerate(train_data):
        n_cal = max(1, round(data.units() * calib_fraction))
        if data.units() - n_cal < 1:
            raise PredictorError(f"need at least 2 batch units to train and calibrate, got {data.units()}")
        fit, cal = data.split(data.units() - n_cal)
        started = time.perf_counter()
        row: dict[str, Any] = {"layer": li}
        if "mlp" in bank.predictors:
            p = bank["mlp", li]
            row["mlp_loss"] = train_mlp(
                p, fit, steps=steps, noise=noise, recall_weight=recall_weight, seed=seed * 1000 + li
            )
            row["mlp_slack"] = calibrate_mlp(p, cal, recall_target)
        if "attention" in bank.predictors:
            p = bank["attention", li]
            row["attn_loss"] = train_attention(p, fit, steps=steps, noise=noise, seed=seed * 1000 + li)
            row["attn_tau_slack"] = calibrate_attention(p, cal, mass_target)
        row["train_s"] = round(time.perf_counter() - started, 2)
        info["layers"].append(row)
        if log:
            log(f"layer {li}: {row}")
    return bank, info
