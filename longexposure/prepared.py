"""What a fine-tuning run on a pretrained ReLU model needs made first, each cached under the cache directory.

`pretrained_weights`: the project's own pretrained checkpoint of a preset (`longexposure pretrain`).
`reordered_weights`: a checkpoint with every MLP's neurons permuted by activation mass on the run's data (exact:
the model computes the same function), so block-wise MLP sparsity exists to be predicted.
`auto_predictors`: the checkpoint's predictor bank, trained on the run's data (another seed than the run's).
The loss-curve suites and `longexposure finetune` share them, so both fine-tune the same thing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from longexposure.paths import cache_dir, write_text_atomic
from longexposure.training import TrainingSetup

PREDICTOR_OPTIONS = ("mlp_block", "attn_block", "theta", "tau", "recall_target")


def pretrained_weights(preset: str, steps: int | None) -> Path:
    """The cached pretrained checkpoint of `preset`, pretraining it first when there is none or only an
    interrupted save (`config.json` is written first; its `pretrain.json` marks it complete)."""
    from longexposure.pretrain import is_complete, pretrain

    path = cache_dir() / preset
    if not is_complete(path):
        tqdm.write(f"no pretrained {preset} at {path}: pretraining it now (cached for later runs)")
        pretrain(preset, out=path, steps=steps, log=tqdm.write)
    return path


def _digest(key: dict[str, Any]) -> str:
    """A short stable name for a cache entry made from `key` (a JSON-able description of its inputs)."""
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _batches(case: TrainingSetup, model: torch.nn.Module, n: int, seed: int) -> tuple[list, str]:
    """`n` batches of the case's dataset drawn with `seed`, and their description."""
    from longexposure.data import model_batches

    stream = model_batches(
        model,
        case.dataset,
        batch=case.batch,
        seq_len=case.seq_len,
        seed=seed,
        path=case.data_path,
        split=case.data_split,
    )
    return stream.input_ids(n), f"{stream.description} (seed {seed})"


def _data_key(case: TrainingSetup, batches: int) -> dict[str, Any]:
    """The part of a cache key that says which batches of which data a cached product was made from."""
    return {
        "dataset": case.dataset,
        "data_path": case.data_path,
        "data_split": case.data_split,
        "batch": case.batch,
        "seq_len": case.seq_len,
        "batches": batches,
    }


def reordered_weights(
    case: TrainingSetup, weights: Path, batches: int, device: torch.device, seed: int
) -> tuple[Path, str]:
    """`weights` with every MLP's neurons reordered by activation mass on `batches` batches of
    the case's data (seed + 2: neither the fine-tuning nor the predictors' batches); cached. Returns the
    checkpoint and a note saying what the permutation was computed on."""
    from longexposure.models import build_model
    from longexposure.reorder import neuron_stats, reorder_mlp_

    key = {
        "weights": str(weights),
        "mtime": (weights / "config.json").stat().st_mtime,
        **_data_key(case, batches),
        "seed": seed + 2,
    }
    out = cache_dir() / "reordered" / f"{case.model}-{_digest(key)}"
    note_file = out / "longexposure_reorder.txt"
    if note_file.exists():
        return out, note_file.read_text()
    model = build_model(case.model, weights=str(weights), attn_implementation="eager", device=device).eval()
    ids, description = _batches(case, model, batches, seed + 2)
    reorder_mlp_(model, neuron_stats(model, ids))
    note = f"MLP neurons of {weights} reordered by activation mass on {len(ids)} batches of {description}"
    model.save_pretrained(out)
    if (weights / "pretrain.json").is_file():  # how the source was pretrained travels with its reordering
        shutil.copyfile(weights / "pretrain.json", out / "pretrain.json")
    write_text_atomic(note_file, note)  # last: a checkpoint without it is incomplete and is rebuilt
    return out, note


def auto_predictors(
    case: TrainingSetup, weights: Path | None, batches: int, steps: int, device: torch.device, seed: int
) -> Path:
    """Train (or reuse) the predictor bank of `weights` (None: the preset's random init, seeded) for this
    case's data and exposure options: `batches` batches drawn with seed + 1, `steps` training steps."""
    from longexposure.predictors.fit import fit_predictors_for
    from longexposure.predictors.offline import PredictorBank

    exposure = case.exposure or {}
    opts = {k: exposure[k] for k in PREDICTOR_OPTIONS if k in exposure}
    key = {
        "weights": str(weights) if weights else f"random-init seed {seed}",
        "mtime": (weights / "config.json").stat().st_mtime if weights else None,
        **_data_key(case, batches),
        "steps": steps,
        "mlp": bool(exposure.get("mlp", True)),
        "attention": bool(exposure.get("attention", True)),
        **opts,
    }
    out = cache_dir() / "predictors" / f"{case.model}-{_digest(key)}"
    if PredictorBank.is_saved(out):  # its JSON is written last: a complete bank of the current format
        return out
    fit_predictors_for(
        case.model,
        str(weights) if weights else None,
        out,
        dataset=case.dataset,
        data_path=case.data_path,
        data_split=case.data_split,
        batch=case.batch,
        seq_len=case.seq_len,
        batches=batches,
        device=device,
        seed=seed,  # the Trainer's model (a random init is seeded the same way)
        data_seed=seed + 1,  # not the fine-tuning stream's batches
        mlp=key["mlp"],
        attention=key["attention"],
        mlp_block=opts.get("mlp_block", 64),
        attn_block=opts.get("attn_block", 64),
        theta=opts.get("theta", 0.1),
        tau=opts.get("tau", 0.95),
        recall_target=opts.get("recall_target", 0.97),
        steps=steps,
    )
    return out
