"""Metrics of the shipped E2E tasks, through maintained libraries: sacrebleu (BLEU) and rouge-score (ROUGE-L).

lm-eval imports this file by path (`!function metrics.NAME` in the YAMLs beside it), so it has no relative
imports. Per document, `process_results` returns what the corpus-level aggregation needs; references are
grouped per meaning representation (MR) as the E2E challenge scores: one prediction per MR against all of its
human references (multi-reference BLEU; ROUGE-L the best over the references, averaged over MRs).
"""

from __future__ import annotations

import math
from typing import Any


def e2e_generation_results(doc: dict[str, Any], results: list[str]) -> dict[str, tuple[list[str], str]]:
    """One MR's generation and its references, for `bleu` and `rouge_l`."""
    prediction = results[0].strip()
    references = [r.strip() for r in doc["references"]]
    return {"bleu": (references, prediction), "rouge_l": (references, prediction)}


def corpus_bleu(items: list[tuple[list[str], str]]) -> float:
    """sacrebleu corpus BLEU (0-100, its default 13a tokenization) with every MR's references; an MR with fewer
    references than the most has its missing ones as None, which sacrebleu skips."""
    import sacrebleu

    predictions = [pred for _, pred in items]
    width = max(len(refs) for refs, _ in items)
    streams = [[refs[i] if i < len(refs) else None for refs, _ in items] for i in range(width)]
    return float(sacrebleu.corpus_bleu(predictions, streams).score)


def mean_rouge_l(items: list[tuple[list[str], str]]) -> float:
    """rouge-score ROUGE-L F-measure (0-1) of each prediction against its best reference, averaged over MRs."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score_multi(refs, pred)["rougeL"].fmeasure for refs, pred in items]
    return sum(scores) / len(scores)


def e2e_loglikelihood_results(doc: dict[str, Any], results: list[tuple[float, bool]]) -> dict[str, tuple[float, int]]:
    """The reference's log-likelihood given its MR, and how many tokens it has (counted when the file was made)."""
    loglikelihood, _ = results[0]
    return {"perplexity": (float(loglikelihood), int(doc["target_tokens"]))}


def token_perplexity(items: list[tuple[float, int]]) -> float:
    """exp(-total log-likelihood / total tokens): the per-token perplexity of every reference, as the training
    loss measures it (not lm-eval's per-document `perplexity`)."""
    total = sum(ll for ll, _ in items)
    tokens = sum(n for _, n in items)
    return math.exp(-total / tokens)
