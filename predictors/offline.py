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
from longexposure.predictors.lowrank import AttnLowRank, MlpLowRank, PredictorConfig, PredictorError
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


def mlp_truth(data: LayerData, u: int, policy: ThresholdMlp) -> tuple[Tensor, Tensor]:
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
        truth, mass = mlp_truth(data, u, policy)
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
