"""Pretraining: the corpus pipeline, the recipe's checks, the CLI mount, and real shadowy sparsity in relu-micro."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import SHARED
from relu_fixture import e2e_ids, micro_checkpoint, micro_model  # noqa: F401

from longexposure.pretrain import EOS_ID, _clean, export_corpus, load_corpus, pretrain

TOKENIZER = os.path.join(SHARED, "data", "opt-tokenizer")


def test_clean_drops_rst_heading_rules_only():
    text = "Title\n=====\n\n***\nkeep this line\n   ----   \na == b\n"
    assert _clean(text) == "Title\n\nkeep this line\na == b"


def test_text_corpus_tokenizes_and_exports(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.rst.txt").write_text("Hello world.\n=====\n")
    (folder / "b.txt").write_text("The quick brown fox.")
    corpus = load_corpus(folder, TOKENIZER)
    assert corpus.tokens.dtype == np.uint16
    assert (corpus.tokens == EOS_ID).sum() == 2 and corpus.tokens[-1] == EOS_ID
    assert "2 files" in corpus.description
    out = export_corpus(corpus, tmp_path / "carry")
    again = load_corpus(out)
    assert np.array_equal(again.tokens, corpus.tokens) and again.description == corpus.description
    train, held = again.split(0.25)
    assert len(train) + len(held) == len(corpus.tokens) and len(held) >= 1


def test_corpus_and_recipe_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "missing.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .txt"):
        load_corpus(tmp_path / "empty", TOKENIZER)
    with pytest.raises(ValueError, match="no pretraining recipe for preset 'opt-tiny'"):
        pretrain("opt-tiny", out=tmp_path / "x")
    with pytest.raises(ValueError, match="unknown recipe option"):
        pretrain("relu-micro", out=tmp_path / "x", stepz=3)


def test_cli_mounts_pretrain():
    from longexposure.cli import build_parser

    args = build_parser().parse_args(["pretrain", "--preset", "relu-micro", "--steps", "5", "--out", "/tmp/x"])
    assert args.preset == "relu-micro" and args.steps == 5
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pretrain", "--preset", "opt-1.3b"])


def test_micro_model_shows_shadowy_sparsity(micro_checkpoint):  # noqa: F811
    """Trained ReLU activations are sparse per token but much less so over a sequence (Fig. 4)."""
    record = json.loads((micro_checkpoint / "pretrain.json").read_text())
    assert "python3.11-doc" in record["corpus"] and "OPT tokens" in record["corpus"]
    assert record["history"][-1]["loss"] < record["history"][0]["loss"] - 2.0
    rows = record["mlp_sparsity_held_out"]
    per_token = [r["per_token_sparsity"] for r in rows]
    per_seq = [r["per_sequence_sparsity"] for r in rows]
    assert np.mean(per_token[1:]) > 0.6, per_token  # random init: ~0.5
    assert all(t > s for t, s in zip(per_token, per_seq, strict=True)), (per_token, per_seq)


def test_checkpoint_loads_as_a_model_path_and_as_preset_weights(micro_checkpoint, e2e_ids):  # noqa: F811
    from longexposure.models import build_model

    by_path = build_model(str(micro_checkpoint)).eval()
    by_preset = build_model("relu-micro", weights=str(micro_checkpoint)).eval()
    assert by_path.config.activation_function == "relu" and by_path.config.hidden_size == 128
    with torch.no_grad():
        torch.testing.assert_close(by_path(input_ids=e2e_ids[0]).logits, by_preset(input_ids=e2e_ids[0]).logits)
    assert (micro_checkpoint / "tokenizer.json").exists()
    # every output names the weights and how they were pretrained (the recipe's act_l1 shapes the sparsity)
    described = by_path.config.longexposure_weights
    assert described.startswith(str(micro_checkpoint)) and "act_l1 0.0" in described and "held-out loss" in described


def test_weights_description_survives_a_broken_record(tmp_path):
    from longexposure.models.factory import describe_weights

    assert describe_weights(str(tmp_path)) == str(tmp_path)
    (tmp_path / "pretrain.json").write_text("{not json")
    assert "unreadable" in describe_weights(str(tmp_path))


def _profile_options(checkpoint, **over):
    """sparsity-profile case options for layer 1 of the micro model on one small E2E batch."""
    base = dict(
        model="relu-micro",
        weights=str(checkpoint),
        batch=2,
        seq_len=64,
        batches=1,
        profile_batches=2,
        mlp_block=32,
        attn_block=16,
        layer=1,
    )
    return {**base, **over}


def test_sparsity_profile_task_and_suite(micro_checkpoint, tmp_path):  # noqa: F811
    from pathlib import Path

    from longexposure.suite.config import load_suite
    from longexposure.suite.context import RunContext
    from longexposure.tasks.sparsity_profile import SparsityProfileCase, parse_policy, sparsity_profile

    suite = load_suite(Path(__file__).parents[1] / "suites" / "fig9_sparsity.yaml")
    assert suite.task == "sparsity-profile" and len(suite.cases("cpu-tiny")) == 13 * 4
    ctx = RunContext(device=torch.device("cpu"), preset="cpu-tiny", out_dir=tmp_path, shared_dir=Path(SHARED))
    common = _profile_options(micro_checkpoint)
    tok = sparsity_profile(SparsityProfileCase(policy="mlp/per-token", **common), ctx)
    seq = sparsity_profile(SparsityProfileCase(policy="mlp/per-sequence", **common), ctx)
    assert tok["sparsity"] > seq["sparsity"]
    thr = sparsity_profile(SparsityProfileCase(policy="mlp/threshold:theta=0.2", **common), ctx)
    assert 0 < thr["density"] < 1 and 0 < thr["mass_kept"] <= 1
    le = sparsity_profile(SparsityProfileCase(policy="attention/long-exposure:tau=0.9", **common), ctx)
    assert le["mass_kept"] >= 0.9
    for key in ("weights", "data", "sparsity_source", "reorder"):
        assert key in tok["info"]
    with pytest.raises(ValueError, match="expected 'mlp/NAME"):
        parse_policy("threshold")
    with pytest.raises(ValueError, match="not divisible by attn_block"):
        SparsityProfileCase(seq_len=100, attn_block=16)


def test_sparsity_profile_times_the_pattern_each_policy_chose(micro_checkpoint, tmp_path):  # noqa: F811
    """Fig. 9 (right): the operator runs exactly the pattern the policy picked on the layer's real inputs."""
    from pathlib import Path

    from longexposure.suite.context import RunContext
    from longexposure.tasks.sparsity_profile import SparsityProfileCase, sparsity_profile

    ctx = RunContext(device=torch.device("cpu"), preset="cpu-tiny", out_dir=tmp_path, shared_dir=Path(SHARED))
    common = _profile_options(micro_checkpoint, dtype="float32", warmup=1, reps=2)
    cases = [
        ("mlp/threshold:theta=0.3", "torch-gather"),
        ("mlp/threshold:theta=0.3", "triton"),
        ("mlp/shadowy:block_size=1", "torch-gather"),
        ("attention/long-exposure:tau=0.9", "triton"),
    ]
    for policy, backend in cases:
        out = sparsity_profile(SparsityProfileCase(policy=policy, time_backend=backend, **common), ctx)
        assert out["timed_density"] == pytest.approx(out["density"]), (policy, backend)
        assert out["fwd_ms"]["p50"] > 0 and out["fwd_bwd_ms"]["p50"] > 0 and out["bwd_ms"] >= 0
    dense = sparsity_profile(SparsityProfileCase(policy="attention/dense", time_backend="sdpa", **common), ctx)
    assert dense["timed_density"] == 1.0
    with pytest.raises(ValueError, match="block_size"):  # the neuron-block operator has no 1-neuron blocks
        sparsity_profile(SparsityProfileCase(policy="mlp/shadowy:block_size=1", time_backend="triton", **common), ctx)
    with pytest.raises(ValueError, match="Fig. 4 statistic"):
        SparsityProfileCase(policy="mlp/per-token", time_backend="triton")
