"""The E2E evaluation rows the shipped `e2e_nlg` / `e2e_ppl` tasks read, made from the user's E2E file.

lm-eval works on text; the E2E release the project trains on holds token ids (`context` / `completion`, OPT's
tokenizer). Rather than keep a second, text copy of the data whose split could drift from the training one,
the rows are made at evaluation time from the same file `finetune` trains on: the held-out split comes from
`data.builtin.e2e_split` on the token ids (every 10th meaning representation, never trained on), and the ids
are decoded with the evaluation tokenizer (exact for the release: decode then encode gives the same ids). A
text file of the E2E challenge's own rows (`mr`, `ref`: e.g. its devset or testset, disjoint from training by
construction) is used as given. The rows are written under the run's work directory, never into the project.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

E2E_EVAL_SPLITS = ("held-out", "all")


@dataclass
class E2EGroup:
    """One meaning representation: the prompt the model continues, and every human reference."""

    prompt: str
    mr: str
    references: list[str]


def _jsonl(file: Path) -> list[dict[str, Any]]:
    rows = []
    with file.open() as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"{file}:{line_no}: expected a JSON object per line")
                rows.append(row)
    if not rows:
        raise ValueError(f"{file}: no rows")
    return rows


def e2e_groups(file: Path, tokenizer: Any, split: str = "held-out") -> tuple[list[E2EGroup], str]:
    """The MRs of `file` to evaluate on, with their references, and a one-line description.

    Token-id rows (`context`, `completion`): the `split` of `e2e_split` (default `held-out`; `all` when the
    whole file is an evaluation file), decoded with `tokenizer`; the prompt keeps the context's end-of-sequence
    token as text, since the model was fine-tuned on `context + completion`. Text rows (`mr`, `ref`): every row,
    grouped by MR; the prompt is the MR followed by the tokenizer's EOS text, as in training.
    """
    from longexposure.data.builtin import HELD_OUT_EVERY, e2e_split

    if split not in E2E_EVAL_SPLITS:
        raise ValueError(f"E2E evaluation split {split!r} is not one of {list(E2E_EVAL_SPLITS)}")
    rows = _jsonl(file)
    first = rows[0]
    grouped: dict[str, E2EGroup] = {}
    if "context" in first and "completion" in first:
        pairs = e2e_split([(row["context"], row["completion"]) for row in rows], split)
        for context, completion in pairs:
            prompt = tokenizer.decode(context, skip_special_tokens=False)
            if prompt not in grouped:
                grouped[prompt] = E2EGroup(prompt, tokenizer.decode(context, skip_special_tokens=True).strip(), [])
            grouped[prompt].references.append(tokenizer.decode(completion, skip_special_tokens=True).strip())
        part = f"held-out split: every {HELD_OUT_EVERY}th meaning representation" if split == "held-out" else "all"
        how = f"token ids decoded with the tokenizer, {part}"
    elif "mr" in first and "ref" in first:
        eos = tokenizer.eos_token or ""
        for line_no, row in enumerate(rows, 1):
            if "mr" not in row or "ref" not in row:
                raise ValueError(f"{file}:{line_no}: expected keys 'mr' and 'ref', got {sorted(row)}")
            mr = str(row["mr"]).strip()
            grouped.setdefault(mr, E2EGroup(mr + eos, mr, [])).references.append(str(row["ref"]).strip())
        how = "text rows used as given (an evaluation file: it must not be one the model was trained on)"
    else:
        raise ValueError(
            f"{file}: expected E2E rows with 'context' and 'completion' token ids (the release the project trains "
            f"on) or with 'mr' and 'ref' text, got keys {sorted(first)}"
        )
    groups = list(grouped.values())
    refs = sum(len(g.references) for g in groups)
    return groups, f"e2e {file} ({len(groups)} meaning representations, {refs} references; {how})"


def write_nlg_rows(groups: Iterable[E2EGroup], out: Path) -> Path:
    """`e2e_nlg` rows: one per MR, with all of its references."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"prompt": g.prompt, "mr": g.mr, "references": g.references}) + "\n"
                           for g in groups))  # fmt: skip
    return out


def write_ppl_rows(groups: Iterable[E2EGroup], tokenizer: Any, out: Path) -> Path:
    """`e2e_ppl` rows: one per reference; the target is the reference after the prompt (a leading space, and the
    EOS the model learnt to end with), `target_tokens` its length in the tokenizer's tokens (for per-token ppl)."""
    eos = tokenizer.eos_token or ""
    lines = []
    for g in groups:
        for ref in g.references:
            target = " " + ref + eos
            n = len(tokenizer(target, add_special_tokens=False)["input_ids"])
            lines.append(json.dumps({"prompt": g.prompt, "target": target, "target_tokens": n}) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines))
    return out
