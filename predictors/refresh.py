"""Refresh an MLP predictor on the current model's activations, during fine-tuning.

Predictors are trained on the frozen model, but fine-tuning moves the MLP inputs (LoRA on attention
changes what every later layer sees), and a stale predictor then misses blocks that became active or
keeps blocks that went quiet. Measured with `benchmarks/predictor_drift.py` on relu-micro (act_l1 3):
recall against the `threshold` exposer fell from 1.00 to 0.39 in 90 LoRA steps while the exposer's
density doubled; on the H100's relu-small (fig11) the predictors kept 0.85 of the blocks where the
oracle kept 0.45. A refresh computes the layer's true activations on the batch at hand (one dense fc1
product of the frozen weights, as the `oracle` source does). The predictor, trained on the batches of
earlier refreshes, is first recalibrated on this batch, which it has not seen (calibrating on the batch
it was just fitted to kept too few blocks on the next ones: in-sample recall 1.0, held out 0.71 on
relu-micro); a slack above 1 lets it give blocks up as well as add them. Then this batch joins a small
buffer of recent batches (a token subsample) that the predictor takes a few optimizer steps on, for
the next refresh.

`refresh_layers` refreshes every layer in one go, and that is what `Exposure.after_step` runs: the slack
grids of all layers are scored in one batched comparison (`offline.stacked_slack_metrics`), the predictors
of all layers train together with their parameters stacked (`offline.train_mlp_group`: one optimizer step
updates every layer; on a GPU the steps replay one captured CUDA graph, with bf16 matmuls for bf16 MLP
inputs), everything stays on the device, and the report rows of all layers come back in one host read.
Parameters, scale buffers and thresholds change in place, so a CUDA graph that captured the predictors
replays the refreshed ones. On an H200 (8 layers, d 2048, ffn 8192, block 64, 4096 bf16 tokens; measured
with `benchmarks/bench_refresh.py`) a refresh of all layers took 46 ms with 20 optimizer steps and 70 ms
with 50, where the layer-by-layer refresh it replaces took 340 ms and 750 ms (264 host syncs). With the
captured training step kept and the calibration as one batched bf16 forward for all layers (63db4a5, H100):
15.3 ms with 5 steps, 34.4 ms with 20 (21.5 and 39.8 ms when the calibration ran each predictor on its own).
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from longexposure.predictors.lowrank import PredictorError
from longexposure.predictors.offline import (
    MLP_METRICS,
    LayerData,
    first_reaching,
    mlp_block_stats,
    slack_tensor,
    stacked_slack_metrics,
    train_mlp_group,
)
from torch import Tensor, nn

# slack multiplies theta: above 1 drops more blocks than the exposer's theta would, below 1 keeps more
REFRESH_SLACKS = (2.0, 1.5, 1.25, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
# a refresh's report row, per layer (all floats)
ROW_KEYS = ("recall_before", "density_before", "recall_after", "density_after", "exposer_density", "slack")


@dataclass(frozen=True)
class RefreshConfig:
    """How predictors are refreshed: `steps` optimizer steps at `lr` on the last `buffer` refresh
    batches (`keep_tokens` tokens of each; until `buffer` refreshes have run the newest fills the other
    slots), and the largest slack in REFRESH_SLACKS whose recall on the new batch reaches `recall_target`.

    20 steps (50 before): on CPU-sized layers whose pattern drifts (fc1 weights moving over 6 refreshes) or
    moves at once (blocks going quiet and others waking), 8 seeds, held-out recall was 0.991 / 0.995 with
    20 steps against 0.991 / 0.989 with 50; after an abrupt move the predicted density comes down more
    slowly (0.20 above the exposer's on average over the 6 refreshes, against 0.12), on drift it is the same.
    """

    steps: int = 20
    lr: float = 1e-3
    recall_target: float = 0.97
    buffer: int = 4
    keep_tokens: int = 2048

    def __post_init__(self) -> None:
        ok = self.steps >= 0 and self.lr > 0 and 0 < self.recall_target <= 1 and min(self.buffer, self.keep_tokens) >= 1
        if not ok:
            raise ValueError(f"refresh needs steps, lr > 0, 0 < recall_target <= 1, buffer, keep_tokens >= 1: {self}")


def _gpu_low_dtype(t: Tensor) -> torch.dtype | None:
    """bf16 / fp16 for such a tensor on a GPU (a refresh then multiplies in that dtype, as the model's autocast
    does), None elsewhere (fp32)."""
    return t.dtype if t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) else None


def _relu_block_stats(z: Tensor, block_size: int) -> tuple[Tensor, Tensor]:
    """`mlp_block_stats` of relu(z), for fc1's pre-activation `z`: compiled below into one pass over z."""
    return mlp_block_stats(F.relu(z), block_size)


# On a GPU one Inductor kernel reads the pre-activation once; eagerly the ReLU, comparison and two reductions over
# 64-wide blocks took ~2.4 ms of an 8-layer refresh on the H100 (4096 x 8192 per layer; profile at 63db4a5). The
# true-activation phase went from 5.0 to 2.0 ms (6d601ba), the whole 5-step refresh stayed at 15.4 ms: host-bound
_fused_relu_block_stats = torch.compile(_relu_block_stats, fullgraph=True, dynamic=False)


def layer_data(x: Tensor, fc1: nn.Linear, block_size: int) -> LayerData:
    """One batch unit of training pairs from the MLP input `x` (..., d): the frozen fc1's ReLU outputs
    reduced per token to each neuron block's active fraction and mass (float32).

    On a GPU a bf16 / fp16 `x` is multiplied in its own dtype (cuBLAS accumulates in fp32; the products are
    rounded as the model's own forward rounds them) and the block stats are one compiled pass over the product,
    elsewhere in fp32, eagerly. `mlp_x` keeps x's dtype (a predictor reads its input through `.to(weight dtype)`,
    so this loses nothing). No host sync."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        x2 = x.detach().reshape(-1, x.shape[-1])
        low = _gpu_low_dtype(x)
        dtype = low or torch.float32
        bias = None if fc1.bias is None else fc1.bias.to(dtype)
        z = F.linear(x2.to(dtype), fc1.weight.to(dtype), bias)
        if z.shape[-1] % block_size:  # here, not inside the compiled call: a clear error, not a tracing one
            raise PredictorError(f"ffn dim {z.shape[-1]} is not divisible by block_size {block_size}")
        frac, mass = (_relu_block_stats if low is None else _fused_relu_block_stats)(z, block_size)
        unit = lambda t: t[None, None]  # noqa: E731  (U=1, B=1, S=tokens, ...)
        return LayerData(mlp_x=unit(x2 if low is not None else x2.float()), mlp_frac=unit(frac), mlp_mass=unit(mass))


class MlpRefresher:
    """One layer's MLP predictor, its frozen fc1, and the recent batches it trains on."""

    def __init__(self, pred: nn.Module, fc1: nn.Linear, config: RefreshConfig, seed: int = 0):
        self.pred, self.fc1, self.config = pred, fc1, config
        self.recent: deque[LayerData] = deque(maxlen=config.buffer)
        self.seed = seed
        self.gen: torch.Generator | None = None  # on the batches' device, made on the first refresh
        self.count = 0

    def __call__(self, x: Tensor) -> dict[str, float]:
        """Recalibrate on `x`'s batch, then train on the recent batches (this one included); returns the
        recall and density on this batch before and after the recalibration (`ROW_KEYS`)."""
        return refresh_layers({0: self}, {0: x})[0]

    def _subsample(self, data: LayerData) -> LayerData:
        """At most `keep_tokens` of the batch's tokens (a copy), drawn on its device (a host-made index would be
        a host-to-device copy, which waits for the device)."""
        tokens, device = data.mlp_x.shape[2], data.mlp_x.device
        if tokens <= self.config.keep_tokens:  # a copy: x may be a CUDA graph's buffer, which the next replay rewrites
            return LayerData(mlp_x=data.mlp_x.clone(), mlp_frac=data.mlp_frac, mlp_mass=data.mlp_mass)
        if self.gen is None or self.gen.device != device:
            self.gen = torch.Generator(device=device).manual_seed(self.seed)
        pick = torch.randperm(tokens, generator=self.gen, device=device)[: self.config.keep_tokens]
        return LayerData(**{k: getattr(data, k).index_select(2, pick) for k in _MLP_FIELDS})

    def _pool(self) -> LayerData:
        """The training pool: `buffer` batches, the newest filling the slots no batch has reached yet. Its shape is
        the same from the first refresh on, so a kept training graph (keyed on it) is captured once, not again at
        each of the first `buffer` refreshes (seen on the H200: 21-36 ms refreshes that recaptured)."""
        recent = list(self.recent)
        recent += recent[-1:] * (self.config.buffer - len(recent))
        return LayerData(**{k: torch.cat([getattr(d, k) for d in recent], dim=2) for k in _MLP_FIELDS})


def _calibrate_group(refreshers: list[MlpRefresher], data: list[LayerData]) -> Tensor:
    """Score each predictor's current threshold and every slack of REFRESH_SLACKS on its batch, and set its
    threshold buffer to the chosen slack in place. The refreshers share a threshold policy, n_blocks and
    recall target. Returns (L, len(ROW_KEYS)) float64 on the device: ROW_KEYS' values, the slack as its
    index in REFRESH_SLACKS. No host sync."""
    preds = [r.pred for r in refreshers]
    slacks = slack_tensor(REFRESH_SLACKS, preds[0].theta_scale.device)
    current = torch.stack([p.theta_scale for p in preds])[:, None]
    scales = torch.cat([current, slacks.expand(len(preds), -1)], 1)  # (L, 1 + K): now, then the grid
    low = _gpu_low_dtype(data[0].mlp_x)  # scored as the fine-tuning step's autocast runs the predictors
    metrics = stacked_slack_metrics(preds, data, scales, matmul_dtype=low)  # (L, 1 + K, metrics)
    recall, density, exposer = (MLP_METRICS.index(k) for k in ("recall", "density", "exposer_density"))
    pick = first_reaching(metrics[:, 1:, recall], refreshers[0].config.recall_target)  # (L,)
    chosen = slacks.index_select(0, pick)
    with torch.no_grad():
        for i, p in enumerate(preds):
            p.theta_scale.copy_(chosen[i])
    before = metrics[:, 0]
    after = metrics[:, 1:].gather(1, pick.to(metrics.device)[:, None, None].expand(-1, 1, metrics.shape[-1]))[:, 0]
    return torch.stack(
        [before[:, recall], before[:, density], after[:, recall], after[:, density], after[:, exposer], pick.to(after)],
        1,
    )


def refresh_layers(
    refreshers: Mapping[int, MlpRefresher], inputs: Mapping[int, Tensor], keep: dict | None = None
) -> dict[int, dict[str, float]]:
    """Refresh the predictor of every layer in `inputs` on its MLP input there; returns a `ROW_KEYS` row per layer.

    Per layer, on the device: the batch's true block stats (`layer_data`), recall and density at the current
    threshold and at every slack of REFRESH_SLACKS at once, the threshold set in place to the largest slack
    whose recall reaches the target (else the smallest). Then the batch joins each layer's recent buffer, and
    the layers' predictors train together (`train_mlp_group`, one group per shape and refresh config; seed:
    the refresher's refresh count, as one refresher alone would train; on a GPU with bf16 / fp16 MLP inputs
    the matmuls in that dtype, fp32 otherwise). The rows (and so each predictor's `config.slack`) are read
    in one host transfer per device, after all the work is queued.

    Args:
        refreshers: per layer, its `MlpRefresher` (layers of `inputs` only are refreshed).
        inputs: per layer, the MLP input (..., d) of the step's batch.
        keep: a dict that keeps each group's captured training step between refreshes (`train_mlp_group`'s
            `keep`; CUDA only): later refreshes replay it instead of warming up and capturing again.
    """
    layers = sorted(inputs)
    data: dict[int, LayerData] = {}
    by_policy: dict[tuple, list[int]] = defaultdict(list)  # layers calibrated together
    for layer in layers:
        r = refreshers[layer]
        data[layer] = layer_data(inputs[layer], r.fc1, r.pred.config.block_size)
        p = r.pred.config.exposer()
        key = (p.theta, p.alpha, p.min_blocks, p.block_size, r.pred.n_blocks, r.config.recall_target)
        by_policy[(*key, data[layer].mlp_x.device)].append(layer)
    rows: dict[int, Tensor] = {}
    for members in by_policy.values():
        group_rows = _calibrate_group([refreshers[layer] for layer in members], [data[layer] for layer in members])
        rows.update(zip(members, group_rows, strict=True))
    groups: dict[tuple, list[int]] = defaultdict(list)
    for layer in layers:
        r = refreshers[layer]
        r.recent.append(r._subsample(data[layer]))
        if r.config.steps:
            pool_tokens = sum(d.mlp_x.shape[:3].numel() for d in r.recent)
            w, low = r.pred.out.weight, _gpu_low_dtype(data[layer].mlp_x)
            key = (type(r.pred), r.pred.config.rank, w.shape, w.dtype, w.device, pool_tokens, low, r.config)
            groups[key].append(layer)
    for (*_, low, config), members in groups.items():
        rs = [refreshers[layer] for layer in members]
        pools = [r._pool() for r in rs]
        seeds = [r.count for r in rs]
        train_mlp_group(
            [r.pred for r in rs], pools, steps=config.steps, lr=config.lr, seeds=seeds, matmul_dtype=low, keep=keep
        )
    out: dict[int, dict[str, float]] = {}
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for layer in layers:
        by_device[rows[layer].device].append(layer)
    for members in by_device.values():
        values = torch.stack([rows[layer] for layer in members]).tolist()  # the host read
        for layer, row in zip(members, values, strict=True):
            r = refreshers[layer]
            slack = REFRESH_SLACKS[int(row[-1])]
            r.pred.config.slack = slack  # the buffer already holds it
            r.pred.requires_grad_(False).eval()
            r.count += 1
            out[layer] = dict(zip(ROW_KEYS, [*row[:-1], slack], strict=True))
    return out


def warm_up(refreshers: Mapping[int, MlpRefresher], inputs: Mapping[int, Tensor], keep_graph: bool) -> float:
    """A throwaway `refresh_layers` on copies of the predictors; returns its wall time in ms (synchronized).

    A process's first refresh pays one-offs that later ones do not (CUDA kernels loaded on first use, library
    handles and workspaces, a first graph pool): 146-152 ms against 21-36 ms on the H200 (relu-base, 8 layers,
    e2e_real's eighth run). Run before timing starts, that cost falls in the warm-up, as compilation does. The
    real predictors, their thresholds, buffers, generators and kept graph are not touched; the frozen fc1 is
    only read."""
    copies = {i: MlpRefresher(copy.deepcopy(r.pred), r.fc1, r.config, seed=r.seed) for i, r in refreshers.items()}
    started = time.perf_counter()
    refresh_layers(copies, inputs, keep={} if keep_graph else None)  # its one host read waits for the device
    return (time.perf_counter() - started) * 1e3


_MLP_FIELDS = ("mlp_x", "mlp_frac", "mlp_mass")
