"""Built-in datasets: `synthetic` (random ids, for timing), `e2e` (tokenized JSONL), `alpaca` (text JSONL),
`corpus` (the project's pretraining corpus: a fine-tuning task in the domain the model was pretrained on).

Each dataset is a function returning `Batches`: an endless iterator of {input_ids, labels} of shape
(batch, seq_len) plus a one-line description recorded in every artifact. Real data is read from a
path the user gives; a missing path is an error, never a silent switch to synthetic tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longexposure.registry import DATASETS

IGNORE_INDEX = -100


@dataclass
class Batches:
    """Endless fixed-shape batches and what they are (for artifacts)."""

    iterator: Iterator[dict[str, torch.Tensor]]
    description: str

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iterator

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(self.iterator)

    def input_ids(self, n: int) -> list[torch.Tensor]:
        """The input ids of the next `n` batches (profiling, predictor training, reordering)."""
        return [next(self.iterator)["input_ids"] for _ in range(n)]


def model_batches(
    model: Any,
    dataset: str = "synthetic",
    *,
    batch: int,
    seq_len: int,
    seed: int = 0,
    path: str | None = None,
    split: str | None = None,
) -> Batches:
    """`load_batches` for `model`: its vocabulary, its parameters' device and its family's tokenization (`split`: the
    dataset's split, None for its default)."""
    from longexposure.arch import family_of

    return load_batches(
        dataset,
        batch=batch,
        seq_len=seq_len,
        vocab_size=model.config.vocab_size,
        path=path,
        seed=seed,
        device=next(model.parameters()).device,
        family=family_of(model),
        **({} if split is None else {"split": split}),
    )


def load_batches(
    name: str,
    *,
    batch: int,
    seq_len: int,
    vocab_size: int,
    path: str | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    family: str | None = None,
    **options: Any,
) -> Batches:
    """Look the dataset up by name and open it.

    `family` (opt, gpt2, llama) picks the matching file when `path` is a directory holding one
    tokenization per family (the E2E release has valid_opt.jsonl and valid_gpt.jsonl). Other keyword
    `options` go to the dataset (e.g. `tokenizer=` for `alpaca`); one it does not take is an error.
    """
    if batch < 1 or seq_len < 2:
        raise ValueError(f"batch ({batch}) must be >= 1 and seq_len ({seq_len}) >= 2")
    return DATASETS.get(name)(
        batch=batch,
        seq_len=seq_len,
        vocab_size=vocab_size,
        path=path,
        seed=seed,
        device=torch.device(device),
        family=family,
        **options,
    )


@DATASETS.register("synthetic", help="uniform random token ids (timing only; no real sparsity)")
def synthetic(
    *,
    batch: int,
    seq_len: int,
    vocab_size: int,
    path: str | None,
    seed: int,
    device: torch.device,
    family: str | None = None,
) -> Batches:
    if path is not None:
        raise ValueError("dataset 'synthetic' takes no path")
    gen = torch.Generator().manual_seed(seed)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        while True:
            ids = torch.randint(0, vocab_size, (batch, seq_len), generator=gen).to(device)
            yield {"input_ids": ids, "labels": ids}

    return Batches(batches(), f"synthetic uniform token ids (vocab {vocab_size}, seed {seed})")


_FILE_TAGS = {"opt": "opt", "gpt2": "gpt", "llama": "llama"}


def _require_file(path: str | None, dataset: str, hint: str, family: str | None = None) -> Path:
    if path is None:
        raise ValueError(f"dataset {dataset!r} needs a path ({hint})")
    p = Path(path).expanduser()
    if p.is_dir():
        candidates = sorted(p.glob("*.jsonl"))
        if family is not None:
            tag = _FILE_TAGS.get(family, family)
            candidates = [c for c in candidates if c.stem.endswith("_" + tag)] or candidates
        if len(candidates) != 1:
            raise FileNotFoundError(
                f"dataset {dataset!r}: expected one .jsonl for family {family!r} in {p}, found "
                f"{[c.name for c in candidates]}; pass the file itself"
            )
        return candidates[0]
    if not p.exists():
        raise FileNotFoundError(f"dataset {dataset!r}: {p} does not exist ({hint})")
    return p


def _rows(file: Path, keys: tuple[str, ...]) -> Iterator[dict]:
    """JSONL rows that must have `keys`; a row without them is an error naming file, line and keys."""
    with file.open() as f:
        for line_no, line in enumerate(f, 1):
            row = json.loads(line)
            if any(k not in row for k in keys):
                expected = " and ".join(repr(k) for k in keys)
                raise ValueError(f"{file}:{line_no}: expected keys {expected}, got {sorted(row)}")
            yield row


def _pack(
    examples: list[list[int]], batch: int, seq_len: int, seed: int, device: torch.device, vocab_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Concatenate shuffled examples into one stream and cut fixed (batch, seq_len) windows (packing)."""
    gen = torch.Generator().manual_seed(seed)
    need = batch * seq_len
    while True:
        order = torch.randperm(len(examples), generator=gen).tolist()
        stream = [t for i in order for t in examples[i]]
        if len(stream) < need:
            raise ValueError(f"the dataset has {len(stream)} tokens, fewer than one batch ({need})")
        if max(stream) >= vocab_size:
            raise ValueError(f"token id {max(stream)} is outside the model's vocabulary ({vocab_size})")
        for start in range(0, len(stream) - need + 1, need):
            ids = torch.tensor(stream[start : start + need]).view(batch, seq_len).to(device)
            yield {"input_ids": ids, "labels": ids}


E2E_SPLITS = ("all", "train", "held-out")
HELD_OUT_EVERY = 10  # every 10th meaning representation (in sorted order) is held out


def e2e_split(examples: list[tuple[list[int], list[int]]], split: str) -> list[tuple[list[int], list[int]]]:
    """The examples of one split. `held-out` takes every HELD_OUT_EVERY-th distinct meaning representation
    (context) in sorted order, with all of its references; `train` the rest: no MR is in both, so a model
    is never evaluated on the texts of an MR it was fine-tuned on."""
    if split not in E2E_SPLITS:
        raise ValueError(f"e2e split {split!r} is not one of {list(E2E_SPLITS)}")
    if split == "all":
        return examples
    held = set(sorted({tuple(c) for c, _ in examples})[::HELD_OUT_EVERY])
    return [(c, r) for c, r in examples if (tuple(c) in held) == (split == "held-out")]


@DATASETS.register(
    "e2e",
    help="E2E NLG tokenized JSONL with context/completion ids (packed; split all/train/held-out)",
    held_out_split="held-out",
)
def e2e(
    *,
    batch: int,
    seq_len: int,
    vocab_size: int,
    path: str | None,
    seed: int,
    device: torch.device,
    family: str | None = None,
    split: str = "all",
) -> Batches:
    if path is None:  # the copy in the shared directory, read in place (never copied into the project)
        from longexposure.paths import shared_dir

        root = shared_dir()
        if root is not None and (root / "data" / "e2e").is_dir():
            path = str(root / "data" / "e2e")
    file = _require_file(
        path,
        "e2e",
        "a directory or .jsonl with context/completion token ids, e.g. ../shared/data/e2e; "
        "by default the shared directory's data/e2e (LONGEXPOSURE_SHARED)",
        family,
    )
    pairs = e2e_split([(row["context"], row["completion"]) for row in _rows(file, ("context", "completion"))], split)
    examples = [c + r for c, r in pairs]
    part = "" if split == "all" else f", split {split}: every {HELD_OUT_EVERY}th meaning representation held out"
    return Batches(
        _pack(examples, batch, seq_len, seed, device, vocab_size),
        f"e2e {file} ({len(examples)} examples{part}, packed to {seq_len})",
    )


CORPUS_SPLITS = ("train", "held-out")


@DATASETS.register(
    "corpus",
    help="the pretraining corpus (OPT-tokenized Python 3.11 docs; split train: what pretraining trains on, held-out)",
    held_out_split="held-out",
)
def corpus(
    *,
    batch: int,
    seq_len: int,
    vocab_size: int,
    path: str | None,
    seed: int,
    device: torch.device,
    family: str | None = None,
    split: str = "train",
) -> Batches:
    """Random windows of the corpus `longexposure pretrain` reads, split exactly as pretraining splits it.

    Why: on E2E the project's ReLU models (pretrained on documentation) gain little from their MLPs, so any MLP
    blocks fine-tune about as well as any others. In the domain the model was pretrained in, its MLP holds what it
    knows, and which blocks a sparse step keeps should show in the held-out loss.
    """
    import numpy as np

    from longexposure.pretrain import load_corpus, random_windows

    if split not in CORPUS_SPLITS:
        raise ValueError(f"corpus split {split!r} is not one of {list(CORPUS_SPLITS)}")
    if family not in (None, "opt"):
        raise ValueError(f"dataset 'corpus' is tokenized with the OPT tokenizer; a {family} model reads other ids")
    data = load_corpus(path)
    tokens = data.split()[0 if split == "train" else 1]
    if len(tokens) <= seq_len:
        raise ValueError(f"corpus split {split!r} has {len(tokens)} tokens, fewer than one window ({seq_len} + 1)")
    if int(tokens.max()) >= vocab_size:
        raise ValueError(f"corpus token id {int(tokens.max())} is outside the model's vocabulary ({vocab_size})")
    gen = np.random.default_rng(seed)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        while True:
            ids = random_windows(tokens, batch, seq_len, gen).to(device)
            yield {"input_ids": ids, "labels": ids}

    part = "the stream pretraining trains on" if split == "train" else "the tail pretraining holds out"
    desc = f"corpus {data.description}, split {split} ({part}: {len(tokens)} tokens), windows of {seq_len}"
    return Batches(batches(), desc)


@DATASETS.register("alpaca", help="instruction/input/output text JSONL, tokenized with a local tokenizer")
def alpaca(
    *,
    batch: int,
    seq_len: int,
    vocab_size: int,
    path: str | None,
    seed: int,
    device: torch.device,
    family: str | None = None,
    tokenizer: str | None = None,
) -> Batches:
    file = _require_file(path, "alpaca", "a .jsonl with instruction/input/output fields", family)
    tok_path = tokenizer or str(file.parent / "tokenizer")
    from transformers import AutoTokenizer

    if not Path(tok_path).exists():
        raise FileNotFoundError(f"dataset 'alpaca': tokenizer directory {tok_path} does not exist")
    tok = AutoTokenizer.from_pretrained(tok_path)
    examples = []
    for row in _rows(file, ("instruction", "output")):
        prompt = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
        examples.append(tok(prompt + "\n" + row["output"])["input_ids"] + [tok.eos_token_id])
    return Batches(
        _pack(examples, batch, seq_len, seed, device, vocab_size),
        f"alpaca {file} ({len(examples)} examples, tokenizer {tok_path}, packed to {seq_len})",
    )
