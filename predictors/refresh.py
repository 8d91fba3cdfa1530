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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from longexposure.predictors.offline import LayerData, calibrate_mlp, evaluate_mlp, mlp_block_stats, train_mlp
from torch import Tensor, nn

# slack multiplies theta: above 1 drops more blocks than the exposer's theta would, below 1 keeps more
REFRESH_SLACKS = (2.0, 1.5, 1.25, 1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


@dataclass(frozen=True)
class RefreshConfig:
    """How predictors are refreshed: `steps` optimizer steps at `lr` on the last `buffer` refresh
    batches (`keep_tokens` tokens of each), and the largest slack in REFRESH_SLACKS whose recall on the
    new batch reaches `recall_target`."""

    steps: int = 50
    lr: float = 1e-3
    recall_target: float = 0.97
    buffer: int = 4
    keep_tokens: int = 2048

    def __post_init__(self) -> None:
        ok = self.steps >= 0 and self.lr > 0 and 0 < self.recall_target <= 1 and min(self.buffer, self.keep_tokens) >= 1
        if not ok:
            raise ValueError(f"refresh needs steps, lr > 0, 0 < recall_target <= 1, buffer, keep_tokens >= 1: {self}")


def layer_data(x: Tensor, fc1: nn.Linear, block_size: int) -> LayerData:
    """One batch unit of training pairs from the MLP input `x` (..., d): the frozen fc1's ReLU outputs
    reduced per token to each neuron block's active fraction and mass."""
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        bias = None if fc1.bias is None else fc1.bias.float()
        frac, mass = mlp_block_stats(F.relu(F.linear(x2, fc1.weight.float(), bias)), block_size)
        unit = lambda t: t[None, None]  # noqa: E731  (U=1, B=1, S=tokens, ...)
        return LayerData(mlp_x=unit(x2), mlp_frac=unit(frac), mlp_mass=unit(mass))


class MlpRefresher:
    """Refreshes one layer's MLP predictor; keeps the recent batches it trains on."""

    def __init__(self, pred: nn.Module, fc1: nn.Linear, config: RefreshConfig, seed: int = 0):
        self.pred, self.fc1, self.config = pred, fc1, config
        self.recent: deque[LayerData] = deque(maxlen=config.buffer)
        self.gen = torch.Generator().manual_seed(seed)
        self.count = 0

    def __call__(self, x: Tensor) -> dict[str, float]:
        """Recalibrate on `x`'s batch, then train on the recent batches (this one included); returns the
        recall and density on this batch before and after the recalibration."""
        data = layer_data(x, self.fc1, self.pred.config.block_size)
        before = evaluate_mlp(self.pred, data, self.pred.config, time_it=False)
        slack = calibrate_mlp(self.pred, data, self.config.recall_target, grid=REFRESH_SLACKS)
        after = evaluate_mlp(self.pred, data, self.pred.config, time_it=False)
        self.recent.append(self._subsample(data))
        if self.config.steps:
            pool = LayerData(**{k: torch.cat([getattr(d, k) for d in self.recent], dim=2) for k in _MLP_FIELDS})
            with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
                self.pred.requires_grad_(True)
                try:
                    train_mlp(self.pred, pool, steps=self.config.steps, lr=self.config.lr, seed=self.count)
                finally:
                    self.pred.requires_grad_(False).eval()
        self.count += 1
        return {
            "recall_before": before["recall"],
            "density_before": before["density"],
            "recall_after": after["recall"],
            "density_after": after["density"],
            "exposer_density": after["exposer_density"],
            "slack": slack,
        }

    def _subsample(self, data: LayerData) -> LayerData:
        tokens = data.mlp_x.shape[2]
        if tokens <= self.config.keep_tokens:
            return data
        pick = torch.randperm(tokens, generator=self.gen)[: self.config.keep_tokens].to(data.mlp_x.device)
        return LayerData(**{k: getattr(data, k).index_select(2, pick) for k in _MLP_FIELDS})


_MLP_FIELDS = ("mlp_x", "mlp_frac", "mlp_mass")
