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
5. `PredictorBank`: one predictor per (layer, target), saved as `predictors.json` + `predictors.pt`.
"""

from __future__ import annotations

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
from longexposure.predictors.lowrank import AttnLowRank, MlpLowRank, PredictorConfig, PredictorError
from torch import Tensor, nn

from longexposure.exposers import ThresholdMlp, attention_block_mass, attention_density, attention_mass_kept
from longexposure.measure import time_fn
from longexposure.profiling import capture, decoder_layers, num_heads
from longexposure.registry import PREDICTORS

FORMAT_VERSION = 1


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
    return (blocks > 0).float().mean(-1), blocks.sum(-1)


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
    """Fit per-token block (count fraction, mass); returns the loss every 50 steps."""
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


def _mlp_truth(data: LayerData, u: int, policy: ThresholdMlp) -> tuple[Tensor, Tensor]:
    """(exposer block mask, true block mass) of batch unit u."""
    count = data.mlp_frac[u].float().sum((0, 1)) * policy.block_size
    mass = data.mlp_mass[u].float().sum((0, 1))
    return policy.mask_from_stats(count, mass), mass


@torch.no_grad()
def evaluate_mlp(
    pred: nn.Module, data: LayerData, config: PredictorConfig, *, time_it: bool = True
) -> dict[str, float]:
    """Mean over batch units: recall / precision vs. the exposer, densities, activation mass kept, ms per call."""
    policy = config.exposer()
    rows = []
    for u in range(data.units()):
        truth, mass = _mlp_truth(data, u, policy)
        got = pred.block_mask(data.mlp_x[u])
        hit = (got & truth).sum().item()
        rows.append(
            {
                "recall": hit / max(1, truth.sum().item()),
                "precision": hit / max(1, got.sum().item()),
                "density": got.float().mean().item(),
                "exposer_density": truth.float().mean().item(),
                "mass_kept": float(mass[got].sum() / mass.sum().clamp_min(1e-12)),
                "exposer_mass_kept": float(mass[truth].sum() / mass.sum().clamp_min(1e-12)),
            }
        )
    out = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    if time_it:
        x = data.mlp_x[0]
        out["ms_per_call"] = time_fn(lambda: pred(x), x.device, warmup=2, reps=5).p50
    return out


def _calibrate(pred: nn.Module, field: str, grid: Sequence[float], score: Callable[[], float], target: float) -> float:
    """Set `pred.config.<field>` to the first grid value whose score reaches `target` (else the last)."""
    chosen = grid[-1]
    for value in grid:
        setattr(pred.config, field, value)
        if score() >= target:
            chosen = value
            break
    setattr(pred.config, field, chosen)
    return chosen


@torch.no_grad()
def calibrate_mlp(
    pred: nn.Module,
    data: LayerData,
    recall_target: float = 0.97,
    grid: Sequence[float] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3),
) -> float:
    """Set `pred.config.slack` to the largest grid value whose mean recall on `data` reaches the target."""
    return _calibrate(
        pred, "slack", grid, lambda: evaluate_mlp(pred, data, pred.config, time_it=False)["recall"], recall_target
    )


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
def _model_id(model: nn.Module) -> dict[str, Any]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config
    return {
        "model_type": cfg.model_type,
        "weights": str(getattr(cfg, "longexposure_weights", "unknown")),
        "hidden_size": cfg.hidden_size,
        "ffn_dim": getattr(cfg, "ffn_dim", None),
        "layers": len(decoder_layers(model)),
        "heads": num_heads(model),
    }


class PredictorBank:
    """One predictor per (target, layer) of a model; saves and loads per model.

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
        """Write predictors.json (names, per-layer configs, model identity) and predictors.pt (trained weights)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {"format": FORMAT_VERSION, "model": _model_id(model), "targets": {}}
        state: dict[str, Any] = {}
        for target, preds in self.predictors.items():
            name = self.names[target]
            meta["targets"][target] = {"name": name, "configs": [p.config.to_dict() for p in preds]}
            if PREDICTORS.entry(name).meta.get("trainable"):
                for i, p in enumerate(preds):
                    state[f"{target}.{i}"] = {k: v.detach().cpu() for k, v in p.state_dict().items()}
        if report is not None:
            meta["report"] = report
        (directory / "predictors.json").write_text(json.dumps(meta, indent=2) + "\n")
        torch.save(state, directory / "predictors.pt")
        return directory

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module) -> PredictorBank:
        """Rebuild the saved predictors for `model` (checked against the saved shapes) and load their weights."""
        directory = Path(directory)
        meta_path = directory / "predictors.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"no saved predictors at {meta_path}")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise PredictorError(f"{meta_path}: format {meta.get('format')} != {FORMAT_VERSION}")
        here = _model_id(model)
        for key in ("hidden_size", "ffn_dim", "layers", "heads"):
            if meta["model"][key] != here[key]:
                raise PredictorError(
                    f"{meta_path}: saved for {key}={meta['model'][key]}, but this model has {key}={here[key]}"
                )
        state = torch.load(directory / "predictors.pt", map_location="cpu")
        preds: dict[str, list[nn.Module]] = {}
        names: dict[str, str] = {}
        for target, spec in meta["targets"].items():
            names[target] = spec["name"]
            preds[target] = []
            for i, cfg in enumerate(spec["configs"]):
                p = build_predictor(spec["name"], model, i, PredictorConfig(**cfg))
                if f"{target}.{i}" in state:
                    p.load_state_dict(state[f"{target}.{i}"])
                preds[target].append(p.eval())
        return cls(preds, names)


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
