"""`longexposure pretrain`: train a small ReLU OPT-architecture model from scratch on an offline corpus.

Why: the exposers and predictors need a model whose ReLU activations are really sparse. Random-init
weights are not (about 50% of neurons fire per token, nearly all of them over a sequence) and real
OPT weights cannot be downloaded here, so the project trains its own.

Corpus: the reStructuredText sources of the Python 3.11 documentation, from Debian's `python3.11-doc`
package (12.6 MB download; 497 `.rst.txt` files, 11.0 MB of English prose and code examples), turned
into token ids with the OPT tokenizer (`../shared/data/opt-tokenizer`). The corpus is found, in order:
`--corpus PATH` (a tokenized `.npy`, a text file, or a folder of `.txt`/`.rst.txt` files), the env var
`LONGEXPOSURE_CORPUS`, the tokenized cache `<cache>/corpus/python3.11-doc/tokens.opt.npy`, the installed
package (`/usr/share/doc/python3.11/html/_sources`), or `apt-get download python3.11-doc` into the cache
(no root needed; `apt-get update` must have run once). `<cache>` is `$LONGEXPOSURE_CACHE` or
`~/.cache/longexposure`; nothing is written inside the repository.

Checkpoints: `<cache>/<preset>/` (or `--out`), a complete HF checkpoint (`config.json`, weights,
tokenizer files) plus `pretrain.json` (corpus, steps, losses, held-out loss, per-token / per-sequence
MLP sparsity). Every consumer takes this directory, or any other local HF checkpoint, as `model`.

Recipes (`--steps`, `--batch`, ... override):
    relu-micro   CPU, 2 threads, a few minutes; the output layer is a sampled softmax (the targets of
                 the batch plus shared random negatives), because the 50k-token output layer is ~90%
                 of this tiny model's FLOPs. The body (what the exposers look at) trains as usual.
    relu-small   one GPU: 2400 steps x 64 x 512 tokens (79M) in bf16 autocast with a full softmax, about
                 3 minutes on an H100 (71 ms/step); a 330 s time budget cuts the steps on slower GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

CORPUS_NAME = "python3.11-doc"
CORPUS_PACKAGE = "python3.11-doc"
_INSTALLED_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
EOS_ID = 2  # OPT's </s>


def cache_dir() -> Path:
    """`$LONGEXPOSURE_CACHE`, else `~/.cache/longexposure` (never inside the repository)."""
    return Path(os.environ.get("LONGEXPOSURE_CACHE") or Path.home() / ".cache" / "longexposure").expanduser()


def default_tokenizer() -> Path:
    """The OPT tokenizer in `shared/data/opt-tokenizer` (env `LONGEXPOSURE_TOKENIZER` overrides)."""
    if os.environ.get("LONGEXPOSURE_TOKENIZER"):
        return Path(os.environ["LONGEXPOSURE_TOKENIZER"])
    from longexposure.suite.runner import shared_dir

    shared = shared_dir()
    if shared is None:
        raise FileNotFoundError(
            "no OPT tokenizer: set LONGEXPOSURE_TOKENIZER or LONGEXPOSURE_SHARED (shared/data/opt-tokenizer)"
        )
    return shared / "data" / "opt-tokenizer"


# ----------------------------------------------------------------------------------------------- corpus
def _fetch_package_sources(root: Path) -> Path:
    """Download the Debian package into `root` and unpack it; returns its `_sources` folder."""
    sources = root / "unpacked" / _INSTALLED_SOURCES.relative_to("/")
    if sources.is_dir():
        return sources
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise FileNotFoundError(
            f"corpus {CORPUS_NAME}: not installed at {_INSTALLED_SOURCES}, and apt-get/dpkg-deb are missing; "
            "pass --corpus PATH (a tokenized .npy, a text file or a folder of text files)"
        )
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["apt-get", "download", CORPUS_PACKAGE], cwd=root, capture_output=True, text=True)
    debs = sorted(root.glob(f"{CORPUS_PACKAGE}_*.deb"))
    if not debs:
        raise FileNotFoundError(
            f"corpus {CORPUS_NAME}: `apt-get download {CORPUS_PACKAGE}` failed ({proc.stderr.strip()[-300:]}); "
            f"run `apt-get update` first, or `apt-get install {CORPUS_PACKAGE}`, or pass --corpus PATH"
        )
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root / "unpacked")], check=True)
    if not sources.is_dir():
        raise FileNotFoundError(f"{debs[-1].name} holds no {_INSTALLED_SOURCES}")
    return sources


def _clean(text: str) -> str:
    """Drop reST heading rules (lines of one repeated punctuation mark); keep prose and code as is."""
    keep = []
    for line in text.splitlines():
        s = line.strip()
        if len(s) >= 3 and len(set(s)) == 1 and not s.isalnum():
            continue
        keep.append(line)
    return "\n".join(keep)


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith((".txt", ".rst", ".md")))
    if not files:
        raise FileNotFoundError(f"corpus folder {path} holds no .txt/.rst/.md files")
    return files


def tokenize_texts(files: list[Path], tokenizer: str | Path) -> np.ndarray:
    """One uint16 token stream: each file's cleaned text, tokenized with the OPT tokenizer, then EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    texts = [_clean(f.read_text(errors="replace")) for f in files]
    ids: list[int] = []
    for enc in tok(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(EOS_ID)
    if max(ids) >= 2**16:
        raise ValueError(f"token id {max(ids)} does not fit uint16")
    return np.asarray(ids, dtype=np.uint16)


@dataclass
class Corpus:
    """A tokenized corpus: the token stream and where it came from."""

    tokens: np.ndarray
    description: str
    path: Path

    def split(self, holdout: float = 0.02) -> tuple[np.ndarray, np.ndarray]:
        """(train, held-out): the last `holdout` fraction of the stream is held out."""
        cut = int(len(self.tokens) * (1.0 - holdout))
        return self.tokens[:cut], self.tokens[cut:]


def load_corpus(path: str | Path | None = None, tokenizer: str | Path | None = None) -> Corpus:
    """The tokenized corpus (see the module docstring for the search order); tokenizes and caches once."""
    path = path or os.environ.get("LONGEXPOSURE_CORPUS")
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"corpus {p} does not exist")
        if p.suffix == ".npy":
            tokens = np.load(p)
            meta = p.with_suffix(".json")
            desc = json.loads(meta.read_text())["description"] if meta.exists() else f"tokenized corpus {p}"
            return Corpus(tokens, desc, p)
        files = _text_files(p)
        tokens = tokenize_texts(files, tokenizer or default_tokenizer())
        return Corpus(tokens, f"text corpus {p} ({len(files)} files, {len(tokens)} OPT tokens)", p)
    root = cache_dir() / "corpus" / CORPUS_NAME
    cached = root / "tokens.opt.npy"
    if cached.exists():
        return load_corpus(cached)
    sources = _INSTALLED_SOURCES if _INSTALLED_SOURCES.is_dir() else _fetch_package_sources(root)
    files = sorted(sources.rglob("*.rst.txt"))
    chars = sum(f.stat().st_size for f in files)
    tokens = tokenize_texts(files, tokenizer or default_tokenizer())
    desc = (
        f"Debian {CORPUS_PACKAGE} reST sources ({len(files)} files, {chars / 1e6:.1f} MB text, "
        f"{len(tokens) / 1e6:.2f}M OPT tokens)"
    )
    root.mkdir(parents=True, exist_ok=True)
    np.save(cached, tokens)
    cached.with_suffix(".json").write_text(json.dumps({"description": desc, "files": len(files), "bytes": chars}))
    return Corpus(tokens, desc, cached)


def export_corpus(corpus: Corpus, dest: str | Path) -> Path:
    """Copy the tokenized corpus (and its description) to `dest` (e.g. `.carry/corpus/` for the GPU machine)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{CORPUS_NAME}.opt.npy"
    np.save(out, corpus.tokens)
    out.with_suffix(".json").write_text(json.dumps({"description": corpus.description}))
    return out


# --------------------------------------------------------------------------------------------- training
@dataclass
class Recipe:
    """How one preset is pretrained.

    Attributes:
        steps, batch, seq_len: optimizer steps and the (batch, seq_len) token windows of each step.
        lr, warmup, weight_decay: AdamW with linear warm-up then cosine decay to lr/10.
        sampled_negatives: 0 for a full softmax; else the output layer scores only the batch's target
            tokens plus this many shared uniform negatives (with the log-Q correction).
        device: `cpu` or `cuda` (`auto`: cuda when available).
        amp: bf16 autocast on CUDA.
        time_budget_s: if set, `steps` is cut after 30 steps so that the run fits the budget (the
            cosine schedule follows the new length).
        act_l1: coefficient of an L1 penalty on the ReLU outputs (mean over tokens and neurons),
            which speeds up the emergence of activation sparsity; 0 (default) trains plain LM loss.
            relu-small uses 3: a briefly trained small model otherwise spreads its activations over
            most neuron blocks, where OPT-1.3B's are concentrated (H100, 2026-11-23: block density at
            90% mass 0.06-0.25 instead of 0.28-0.66, same held-out loss; docs/notes/exposer_predictors.md).
    """

    steps: int
    batch: int
    seq_len: int
    lr: float
    warmup: int
    weight_decay: float = 0.1
    sampled_negatives: int = 0
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    log_every: int = 50
    time_budget_s: float | None = None
    act_l1: float = 0.0


RECIPES: dict[str, Recipe] = {
    "relu-micro": Recipe(steps=300, batch=16, seq_len=128, lr=3e-3, warmup=30, sampled_negatives=2048, device="cpu"),
    "relu-small": Recipe(
        steps=2400, batch=64, seq_len=512, lr=1.5e-3, warmup=150, device="auto", time_budget_s=330.0, act_l1=3.0
    ),
}


def _lm_loss(model: torch.nn.Module, ids: torch.Tensor, negatives: int, gen: torch.Generator) -> torch.Tensor:
    """Next-token loss; full softmax, or sampled softmax over the batch's targets + uniform negatives."""
    if negatives == 0:
        return model(input_ids=ids, labels=ids).loss
    hidden = model.model.decoder(input_ids=ids).last_hidden_state[:, :-1]  # (B, S-1, d)
    if getattr(model.model.decoder, "project_out", None) is not None:
        hidden = model.model.decoder.project_out(hidden)
    targets = ids[:, 1:].reshape(-1)
    weight = model.lm_head.weight  # (V, d)
    vocab = weight.shape[0]
    neg = torch.randint(0, vocab, (negatives,), generator=gen).to(ids.device)
    cand, inverse = torch.unique(torch.cat([targets, neg]), return_inverse=True)
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight[cand].T  # (T, C)
    # log-Q correction for the uniform negatives, so the sampled loss estimates the full one's gradient
    logits = logits - math.log(max(1.0, negatives / vocab))
    return F.cross_entropy(logits.float(), inverse[: targets.numel()])


def _windows(tokens: np.ndarray, batch: int, seq_len: int, gen: np.random.Generator) -> torch.Tensor:
    starts = gen.integers(0, len(tokens) - seq_len, size=batch)
    return torch.from_numpy(np.stack([tokens[s : s + seq_len].astype(np.int64) for s in starts]))


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, device: torch.device, n: int = 16) -> float:
    """Mean full-softmax next-token loss over `n` fixed held-out windows."""
    model.eval()
    gen = np.random.default_rng(1234)
    losses = []
    for _ in range(max(1, n // 4)):
        ids = _windows(tokens, 4, seq_len, gen).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    model.train()
    return float(np.mean(losses))


@torch.no_grad()
def mlp_sparsity(model: torch.nn.Module, ids: torch.Tensor) -> list[dict[str, float]]:
    """Per layer: fraction of zero ReLU outputs per token, and of neurons silent over a whole sequence."""
    from longexposure.profiling import capture_mlp

    model.eval()
    acts = capture_mlp(model, ids)
    model.train()
    rows = []
    for act in acts:  # (B, S, F)
        active = act > 0
        rows.append(
            {
                "per_token_sparsity": 1.0 - active.float().mean().item(),
                "per_sequence_sparsity": 1.0 - active.any(dim=1).float().mean().item(),
            }
        )
    return rows


def pretrain(
    preset: str,
    *,
    out: str | Path | None = None,
    corpus: str | Path | None = None,
    tokenizer: str | Path | None = None,
    log: Any = print,
    **overrides: Any,
) -> Path:
    """Pretrain `preset` on the corpus and save a HF checkpoint; returns its directory."""
    from longexposure.models import build_model

    if preset not in RECIPES:
        raise ValueError(f"no pretraining recipe for preset {preset!r}; recipes: {sorted(RECIPES)}")
    unknown = set(overrides) - {f.name for f in fields(Recipe)}
    if unknown:
        raise ValueError(f"unknown recipe option(s) {sorted(unknown)}; valid: {[f.name for f in fields(Recipe)]}")
    recipe = replace(RECIPES[preset], **{k: v for k, v in overrides.items() if v is not None})
    if recipe.steps < 1 or recipe.batch < 1 or recipe.seq_len < 8:
        raise ValueError(f"need steps >= 1, batch >= 1, seq_len >= 8; got {recipe}")
    dev_name = recipe.device if recipe.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(dev_name)
    out_dir = Path(out) if out is not None else cache_dir() / preset
    data = load_corpus(corpus, tokenizer)
    train_tokens, val_tokens = data.split()
    log(f"corpus: {data.description}; train {len(train_tokens)} / held-out {len(val_tokens)} tokens")

    torch.manual_seed(recipe.seed)
    model = build_model(preset, device=device, seed=recipe.seed, attn_implementation="sdpa")
    params_decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    params_other = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW(
        [{"params": params_decay, "weight_decay": recipe.weight_decay}, {"params": params_other, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = np.random.default_rng(recipe.seed)
    tgen = torch.Generator().manual_seed(recipe.seed)
    act_terms: list[torch.Tensor] = []
    hooks = []
    if recipe.act_l1 > 0:
        from longexposure.profiling import decoder_layers

        for layer in decoder_layers(model):
            hooks.append(layer.fc1.register_forward_hook(lambda m, a, out: act_terms.append(F.relu(out).mean())))
    amp = recipe.amp and device.type == "cuda"
    history = []
    started = time.perf_counter()
    model.train()
    step, t10 = 0, 0.0
    while step < recipe.steps:
        if recipe.time_budget_s is not None and step in (10, 30):  # steps 10..30: past start-up costs
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            if step == 10:
                t10 = now
            else:
                per_step = (now - t10) / 20
                fit = int((recipe.time_budget_s - (now - started)) / per_step) + step
                if fit < recipe.steps:
                    log(f"{per_step * 1e3:.0f} ms/step: cutting {recipe.steps} steps to {fit} for the time budget")
                    recipe = replace(recipe, steps=max(fit, step + 1))
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        ids = _windows(train_tokens, recipe.batch, recipe.seq_len, gen).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = _lm_loss(model, ids, recipe.sampled_negatives, tgen)
            total = loss + recipe.act_l1 * torch.stack(act_terms).mean() if act_terms else loss
        act_terms.clear()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if step % recipe.log_every == 0 or step == recipe.steps - 1:
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"pretraining loss became {value} at step {step}")
            history.append({"step": step, "loss": value, "s": round(time.perf_counter() - started, 1)})
            log(f"step {step:5d}  loss {value:.3f}  lr {lr_at(step):.2e}  {time.perf_counter() - started:.0f}s")
        step += 1
    for hook in hooks:
        hook.remove()
    elapsed = time.perf_counter() - started
    val = held_out_loss(model, val_tokens, recipe.seq_len, device)
    probe = _windows(val_tokens, 4, recipe.seq_len, np.random.default_rng(99)).to(device)
    sparsity = mlp_sparsity(model, probe)
    log(f"held-out loss {val:.3f} (ppl {math.exp(val):.1f}); {elapsed:.0f}s")
    for i, row in enumerate(sparsity):
        log(
            f"  layer {i}: per-token sparsity {row['per_token_sparsity']:.3f}, "
            f"per-sequence {row['per_sequence_sparsity']:.3f}"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    model.config.longexposure_weights = str(out_dir)
    model.save_pretrained(out_dir)
    tok_dir = Path(tokenizer) if tokenizer else None
    try:
        tok_dir = tok_dir or default_tokenizer()
        for f in tok_dir.iterdir():
            if f.is_file():
                shutil.copy(f, out_dir / f.name)
    except FileNotFoundError:
        pass  # a checkpoint without tokenizer files still loads; token ids are OPT's
    record = {
        "preset": preset,
        "recipe": asdict(recipe) | {"device": str(device)},
        "corpus": data.description,
        "train_tokens_seen": recipe.steps * recipe.batch * recipe.seq_len,
        "seconds": round(elapsed, 1),
        "history": history,
        "held_out_loss": val,
        "mlp_sparsity_held_out": sparsity,
        "torch": torch.__version__,
    }
    (out_dir / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved {out_dir}")
    return out_dir


def checkpoint_for(preset: str) -> Path:
    """The cached checkpoint of a pretrained preset; an error says how to make it."""
    path = cache_dir() / preset
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no pretrained {preset} at {path}: run `longexposure pretrain --preset {preset}`")
    return path


# -------------------------------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", required=True, choices=sorted(RECIPES), help="which model to pretrain")
    parser.add_argument("--out", default=None, help="checkpoint directory (default: $LONGEXPOSURE_CACHE/<preset>)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's recipe)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--device", default=None, help="cpu, cuda or auto (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--act-l1", type=float, default=None, help="L1 penalty on ReLU outputs (default: the recipe's; relu-small 3)"
    )
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; cuts --steps to fit")
    parser.add_argument("--corpus", default=None, help="tokenized .npy, text file or folder (default: python3.11-doc)")
    parser.add_argument("--tokenizer", default=None, help="OPT tokenizer folder (default: shared/data/opt-tokenizer)")
    parser.add_argument(
        "--export-corpus", default=None, metavar="DIR", help="only tokenize the corpus and copy it to DIR, then exit"
    )


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    if args.export_corpus:
        corpus = load_corpus(args.corpus, args.tokenizer)
        print(f"{corpus.description} -> {export_corpus(corpus, args.export_corpus)}")
        return 0
    pretrain(
        args.preset,
        out=args.out,
        corpus=args.corpus,
        tokenizer=args.tokenizer,
        steps=args.steps,
        batch=args.batch,
        seq_len=args.seq_len,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        act_l1=args.act_l1,
        time_budget_s=args.time_budget,
    )
    return 0
