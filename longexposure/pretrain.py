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
`~/.cache/longexposure`; nothing is written inside the repository. Offline, with none of these, the
error (`CorpusUnavailable`) is one line naming what to install or pass.

Checkpoints: `<cache>/<preset>/` (or `--out`), a complete HF checkpoint (`config.json`, weights,
tokenizer files) plus `pretrain.json` (corpus, steps, losses, held-out loss, per-token / per-sequence
MLP sparsity), written last and atomically: it marks the checkpoint complete (`is_complete`), since
`save_pretrained` writes `config.json` before the weights. Every consumer takes this directory, or any
other local HF checkpoint, as `model`. Every cache file here is written to a temporary name and renamed.

Progress: `longexposure pretrain` shows a tqdm bar when stderr is a terminal, else (CI, a log file, a
pipe) one flushed line on stderr every `--log-every` steps.

Recipes (`--steps`, `--batch`, ... override):
    relu-micro   CPU, 2 threads, a few minutes; the output layer is a sampled softmax (the targets of
                 the batch plus shared random negatives), because the 50k-token output layer is ~90%
                 of this tiny model's FLOPs. The body (what the exposers look at) trains as usual.
    relu-small   one GPU: 2400 steps x 64 x 512 tokens (79M) in bf16 autocast with a full softmax, about
                 3 minutes on an H100 (71 ms/step); a 330 s time budget cuts the steps on slower GPUs.
    relu-base    one GPU: OPT-1.3B's layer shape, 8 layers; 1000 steps x 16 x 1024 tokens (16M, ~4.6 passes
                 over the corpus) in bf16 autocast with the activation-L1 term, cut by a 330 s budget on slow
                 GPUs (the model the end-to-end speed and quality runs share: suite `e2e_real`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F

from longexposure.paths import cache_dir, default_tokenizer, write_atomic, write_text_atomic
from longexposure.suite.provenance import provenance

CORPUS_NAME = "python3.11-doc"
CORPUS_PACKAGE = "python3.11-doc"
_INSTALLED_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
EOS_ID = 2  # OPT's </s>
COMPLETE_MARKER = "pretrain.json"  # written last: a checkpoint without it is an interrupted save
_FETCH_TIMEOUT_S = 600


class CorpusUnavailable(FileNotFoundError):
    """The offline corpus is neither given, cached, installed nor fetchable; the message is one line
    naming what to install or pass (the CLI prints it as is)."""


def _offline_hint(why: str) -> CorpusUnavailable:
    return CorpusUnavailable(
        f"corpus {CORPUS_NAME}: {why}; install it (`apt-get install {CORPUS_PACKAGE}`, or `apt-get update` "
        "first for the download), or pass --corpus PATH / set LONGEXPOSURE_CORPUS (a tokenized .npy, a text "
        "file or a folder of text files)"
    )


def _one_line(text: str, limit: int = 200) -> str:
    """The last non-empty line of a tool's output, shortened: error messages stay one line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "no output")[-limit:]


# ----------------------------------------------------------------------------------------------- corpus
def _run_tool(argv: list[str], cwd: Path) -> subprocess.CompletedProcess | str:
    """Run apt-get / dpkg-deb; a failure to start or a timeout comes back as a one-line reason."""
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=_FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"`{' '.join(argv[:2])}` gave no answer in {_FETCH_TIMEOUT_S} s"
    except OSError as exc:
        return f"`{' '.join(argv[:2])}` could not run ({exc.strerror or exc})"


def _fetch_package_sources(root: Path) -> Path:
    """Download the Debian package into `root` and unpack it; returns its `_sources` folder.

    The package is unpacked into a temporary folder renamed to `unpacked` when whole, so an interrupted
    unpack is never taken for the corpus. Every failure is a `CorpusUnavailable` of one line."""
    relative = _INSTALLED_SOURCES.relative_to("/")
    sources = root / "unpacked" / relative
    if sources.is_dir():
        return sources
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        raise _offline_hint(f"not installed at {_INSTALLED_SOURCES}, and {'/'.join(missing)} is missing")
    root.mkdir(parents=True, exist_ok=True)
    proc = _run_tool(["apt-get", "download", CORPUS_PACKAGE], root)
    debs = sorted(root.glob(f"{CORPUS_PACKAGE}_*.deb"))
    if not debs:
        why = proc if isinstance(proc, str) else _one_line(proc.stderr or proc.stdout)
        raise _offline_hint(
            f"not installed at {_INSTALLED_SOURCES}, and `apt-get download {CORPUS_PACKAGE}` failed: {why}"
        )
    deb = debs[-1]
    staging = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=root))
    try:
        proc = _run_tool(["dpkg-deb", "-x", str(deb), str(staging)], root)
        if isinstance(proc, str) or proc.returncode != 0:
            deb.unlink(missing_ok=True)  # a torn download: fetch it again next time
            why = proc if isinstance(proc, str) else _one_line(proc.stderr or proc.stdout)
            raise _offline_hint(f"{deb.name} could not be unpacked: {why}")
        if not (staging / relative).is_dir():
            raise _offline_hint(f"{deb.name} holds no {_INSTALLED_SOURCES}")
        shutil.rmtree(root / "unpacked", ignore_errors=True)
        os.replace(staging, root / "unpacked")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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
    # the description first, the tokens (what the cache is keyed on) last
    record = {"description": desc, "files": len(files), "bytes": chars}
    write_text_atomic(cached.with_suffix(".json"), json.dumps(record))
    write_atomic(cached, lambda f: np.save(f, tokens))
    return Corpus(tokens, desc, cached)


def export_corpus(corpus: Corpus, dest: str | Path) -> Path:
    """Copy the tokenized corpus (and its description) to `dest` (e.g. `.carry/corpus/` for the GPU machine)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = dest / f"{CORPUS_NAME}.opt.npy"
    write_text_atomic(out.with_suffix(".json"), json.dumps({"description": corpus.description}))
    write_atomic(out, lambda f: np.save(f, corpus.tokens))
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
        act_group_l1: coefficient of a group-lasso penalty on the ReLU outputs: per sequence and neuron the
            root-mean-square over the sequence's tokens, averaged. The L1 term makes each token sparse; this
            one makes each *sequence* use few neurons (per unit of activation, a neuron firing on one of S
            tokens costs sqrt(S) times what one firing on all of them does), the sparsity that survives the
            reduction over a sequence that Long Exposure's patterns are made of.
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
    act_group_l1: float = 0.0


RECIPES: dict[str, Recipe] = {
    "relu-micro": Recipe(steps=300, batch=16, seq_len=128, lr=3e-3, warmup=30, sampled_negatives=2048, device="cpu"),
    "relu-small": Recipe(
        steps=2400, batch=64, seq_len=512, lr=1.5e-3, warmup=150, device="auto", time_budget_s=330.0, act_l1=3.0
    ),
    # OPT-1.3B's layer shape: windows of 1024 (fine-tuning runs at 1024, and OPT's positions are learned).
    # Tried on the H200 (2026-12-04, artifacts/relu_base/): 2600 steps at lr 8e-4 with act_l1 5 gave a worse
    # model (held-out loss 4.05 against 3.02, loss spikes from step 650) and no sparser one (the exposer kept
    # 0.48-0.50 of the MLP blocks either way), so the recipe stays at what measured best.
    "relu-base": Recipe(
        steps=1000, batch=16, seq_len=1024, lr=6e-4, warmup=100, device="auto", time_budget_s=330.0, act_l1=3.0
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


def random_windows(tokens: np.ndarray, batch: int, seq_len: int, gen: np.random.Generator) -> torch.Tensor:
    """`batch` windows of `seq_len` tokens cut at random from the stream (pretraining, and dataset `corpus`)."""
    starts = gen.integers(0, len(tokens) - seq_len, size=batch)
    return torch.from_numpy(np.stack([tokens[s : s + seq_len].astype(np.int64) for s in starts]))


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, tokens: np.ndarray, seq_len: int, device: torch.device, n: int = 16) -> float:
    """Mean full-softmax next-token loss over `n` fixed held-out windows."""
    model.eval()
    gen = np.random.default_rng(1234)
    losses = []
    for _ in range(max(1, n // 4)):
        ids = random_windows(tokens, 4, seq_len, gen).to(device)
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


class StepProgress:
    """Per-step progress on `stream`: a tqdm bar when it is a terminal; else (CI, a log file, a pipe, where
    a bar's carriage returns and a block-buffered stdout show nothing until the end) one flushed line
    every `every` steps."""

    def __init__(self, stream: IO[str], total: int, every: int, desc: str):
        self.stream, self.every = stream, max(1, every)
        isatty = getattr(stream, "isatty", None)
        if isatty is not None and isatty():
            from tqdm import tqdm

            self.bar: Any = tqdm(total=total, desc=desc, unit="step", file=stream, dynamic_ncols=True)
        else:
            self.bar = None

    def step(self, total: int, line: str | None, postfix: str | None = None) -> None:
        """One step done (of `total`, which a time budget may cut); `line` is the step's log line, if any."""
        if self.bar is not None:
            self.bar.total = total
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(1)
        elif line is not None:
            print(line, file=self.stream, flush=True)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _save_quietly(model: torch.nn.Module, out_dir: Path, *, bars: bool) -> None:
    """save_pretrained, without transformers' own progress bar unless on a terminal (in a log, its carriage
    returns are noise)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if not bars:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if was_enabled and not bars:
            hf_logging.enable_progress_bar()


def is_complete(checkpoint: str | Path) -> bool:
    """True when `checkpoint` is a whole `pretrain` output: its `pretrain.json` is written last."""
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def pretrain(
    preset: str,
    *,
    out: str | Path | None = None,
    corpus: str | Path | None = None,
    tokenizer: str | Path | None = None,
    log: Any = print,
    progress: IO[str] | None = None,
    **overrides: Any,
) -> Path:
    """Pretrain `preset` on the corpus and save a HF checkpoint; returns its directory.

    Step lines (every `log_every` steps) go to `log`, or with `progress` (a stream, e.g. sys.stderr) to a
    `StepProgress` on it. The checkpoint's `pretrain.json` is written last: until then it is incomplete.
    """
    from longexposure.models import build_model

    if preset not in RECIPES:
        raise ValueError(f"no pretraining recipe for preset {preset!r}; recipes: {sorted(RECIPES)}")
    unknown = set(overrides) - {f.name for f in fields(Recipe)}
    if unknown:
        raise ValueError(f"unknown recipe option(s) {sorted(unknown)}; valid: {[f.name for f in fields(Recipe)]}")
    recipe = replace(RECIPES[preset], **{k: v for k, v in overrides.items() if v is not None})
    if recipe.steps < 1 or recipe.batch < 1 or recipe.seq_len < 8 or recipe.log_every < 1:
        raise ValueError(f"need steps >= 1, batch >= 1, seq_len >= 8, log_every >= 1; got {recipe}")
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
    if recipe.act_l1 > 0 or recipe.act_group_l1 > 0:
        from longexposure.profiling import decoder_layers

        def activation_penalty(module: torch.nn.Module, args: Any, out: torch.Tensor) -> None:
            act = F.relu(out)  # (B, S, ffn)
            term = recipe.act_l1 * act.mean(dtype=torch.float32)
            if recipe.act_group_l1 > 0:
                per_sequence_rms = (act.pow(2).mean(dim=1, dtype=torch.float32) + 1e-12).sqrt()  # (B, ffn)
                term = term + recipe.act_group_l1 * per_sequence_rms.mean()
            act_terms.append(term)

        for layer in decoder_layers(model):
            hooks.append(layer.fc1.register_forward_hook(activation_penalty))
    amp = recipe.amp and device.type == "cuda"
    history = []
    bar = StepProgress(progress, recipe.steps, recipe.log_every, f"pretrain {preset}") if progress else None
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
                    note = f"{per_step * 1e3:.0f} ms/step: cutting {recipe.steps} steps to {fit} for the time budget"
                    if bar is not None:
                        bar.write(note)
                    else:
                        log(note)
                    recipe = replace(recipe, steps=max(fit, step + 1))
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        ids = random_windows(train_tokens, recipe.batch, recipe.seq_len, gen).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = _lm_loss(model, ids, recipe.sampled_negatives, tgen)
            total = loss + torch.stack(act_terms).mean() if act_terms else loss
        act_terms.clear()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        line = postfix = None
        if step % recipe.log_every == 0 or step == recipe.steps - 1:
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"pretraining loss became {value} at step {step}")
            history.append({"step": step, "loss": value, "s": round(time.perf_counter() - started, 1)})
            line = f"step {step:5d}  loss {value:.3f}  lr {lr_at(step):.2e}  {time.perf_counter() - started:.0f}s"
            postfix = f"loss {value:.3f}"
            if bar is None:
                log(line)
        if bar is not None:
            bar.step(recipe.steps, line, postfix)
        step += 1
    if bar is not None:
        bar.close()
    for hook in hooks:
        hook.remove()
    elapsed = time.perf_counter() - started
    val = held_out_loss(model, val_tokens, recipe.seq_len, device)
    probe = random_windows(val_tokens, 4, recipe.seq_len, np.random.default_rng(99)).to(device)
    sparsity = mlp_sparsity(model, probe)
    log(f"held-out loss {val:.3f} (ppl {math.exp(val):.1f}); {elapsed:.0f}s")
    for i, row in enumerate(sparsity):
        log(
            f"  layer {i}: per-token sparsity {row['per_token_sparsity']:.3f}, "
            f"per-sequence {row['per_sequence_sparsity']:.3f}"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / COMPLETE_MARKER).unlink(missing_ok=True)  # an earlier run's: this save is not complete yet
    model.config.longexposure_weights = str(out_dir)
    _save_quietly(model, out_dir, bars=bar is not None and bar.bar is not None)
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
        **provenance(device),  # the machine, commit and library versions that made these weights
    }
    write_text_atomic(out_dir / COMPLETE_MARKER, json.dumps(record, indent=2) + "\n")  # last: now it is complete
    log(f"saved {out_dir}")
    return out_dir


def checkpoint_for(preset: str) -> Path:
    """The cached checkpoint of a pretrained preset; an error says how to make it. A checkpoint without
    its `pretrain.json` (an interrupted save: `config.json` is written first) is not one."""
    path = cache_dir() / preset
    if not is_complete(path):
        state = "an incomplete (interrupted) save" if (path / "config.json").exists() else "none"
        raise FileNotFoundError(
            f"no pretrained {preset} at {path} ({state}): run `longexposure pretrain --preset {preset}`"
        )
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
    parser.add_argument(
        "--act-group-l1",
        type=float,
        default=None,
        help="group-lasso penalty on each sequence's use of each ReLU neuron (default: the recipe's)",
    )
    parser.add_argument("--time-budget", type=float, default=None, help="seconds; cuts --steps to fit")
    parser.add_argument("--corpus", default=None, help="tokenized .npy, text file or folder (default: python3.11-doc)")
    parser.add_argument("--tokenizer", default=None, help="OPT tokenizer folder (default: shared/data/opt-tokenizer)")
    parser.add_argument(
        "--export-corpus", default=None, metavar="DIR", help="only tokenize the corpus and copy it to DIR, then exit"
    )
    parser.add_argument(
        "--log-every",
        type=int,
        default=None,
        metavar="N",
        help="a progress line on stderr every N steps when stderr is not a terminal (default: the recipe's, 50)",
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
        log=lambda message: print(message, flush=True),
        progress=sys.stderr,
        log_every=getattr(args, "log_every", None),
        steps=args.steps,
        batch=args.batch,
        seq_len=args.seq_len,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        act_l1=args.act_l1,
        act_group_l1=getattr(args, "act_group_l1", None),
        time_budget_s=args.time_budget,
    )
    return 0
