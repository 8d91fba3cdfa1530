"""Pretraining: the corpus pipeline, the recipe's checks, the CLI mount, and real shadowy sparsity in relu-micro."""

import json
import os
from pathlib import Path

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


# ------------------------------------------------------------------ issue 16: caches, offline corpus, progress
FAKE_SOURCES = Path("/nonexistent-longexposure/usr/share/doc/python3.11/html/_sources")
OFFLINE_APT = """#!/bin/sh
echo "Reading package lists..."
echo "W: Some index files failed to download. They have been ignored." >&2
echo "E: Can't select candidate version from package python3.11-doc as it has no candidate" >&2
exit 100
"""
GOOD_APT = "#!/bin/sh\necho fake > python3.11-doc_3.11.2_all.deb\n"
GOOD_DPKG = '#!/bin/sh\nmkdir -p "$3/$REL"\necho "The quick brown fox." > "$3/$REL/intro.rst.txt"\n'
TORN_DPKG = '#!/bin/sh\nmkdir -p "$3/$REL"\necho "dpkg-deb: error: unexpected end of file in archive" >&2\nexit 2\n'


@pytest.fixture
def fake_debian(tmp_path, monkeypatch):
    """Install fake `apt-get` / `dpkg-deb` on PATH; the package is not installed; the cache is empty."""
    import longexposure.pretrain as pretrain_module

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()

    def install(apt: str, dpkg: str = GOOD_DPKG) -> Path:
        for name, text in (("apt-get", apt), ("dpkg-deb", dpkg)):
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        return tmp_path / "cache" / "corpus" / "python3.11-doc"

    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LONGEXPOSURE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("REL", str(FAKE_SOURCES.relative_to("/")))
    monkeypatch.delenv("LONGEXPOSURE_CORPUS", raising=False)
    monkeypatch.setattr(pretrain_module, "_INSTALLED_SOURCES", FAKE_SOURCES)
    return install


def test_offline_corpus_failure_is_one_line_saying_what_to_do(fake_debian, capsys):
    """No network: one line naming the package to install and the flag / env var to pass instead."""
    from longexposure.cli import main
    from longexposure.pretrain import CorpusUnavailable

    fake_debian(OFFLINE_APT)
    with pytest.raises(FileNotFoundError) as err:
        load_corpus(tokenizer=TOKENIZER)
    message = str(err.value)
    assert isinstance(err.value, CorpusUnavailable) and "\n" not in message
    for what in ("apt-get install python3.11-doc", "--corpus PATH", "LONGEXPOSURE_CORPUS", "has no candidate"):
        assert what in message, what
    assert main(["pretrain", "--preset", "relu-micro", "--steps", "1", "--tokenizer", TOKENIZER]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "LONGEXPOSURE_CORPUS" in err_lines[0], err_lines


def test_a_torn_package_is_one_line_and_never_taken_for_the_corpus(fake_debian):
    """dpkg-deb failing half-way (a torn download) leaves no `unpacked` folder to be mistaken for the corpus."""
    root = fake_debian(GOOD_APT, TORN_DPKG)
    with pytest.raises(FileNotFoundError, match="could not be unpacked: dpkg-deb: error: unexpected end") as err:
        load_corpus(tokenizer=TOKENIZER)
    assert "\n" not in str(err.value) and "apt-get install python3.11-doc" in str(err.value)
    assert not (root / "unpacked").exists() and not list(root.glob("*.deb")), "fetched again next time"
    assert not list(root.glob(".unpacking-*"))


def test_fetched_corpus_is_cached_and_a_torn_cache_write_leaves_no_cache(fake_debian, monkeypatch):
    root = fake_debian(GOOD_APT)
    real_save = np.save

    def torn_save(file, arr, *args, **kwargs):  # dies after writing the header
        if isinstance(file, (str, os.PathLike)):
            with open(file, "wb") as f:
                f.write(b"\x93NUMPY\x01\x00")
        else:
            file.write(b"\x93NUMPY\x01\x00")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "save", torn_save)
    with pytest.raises(OSError, match="No space"):
        load_corpus(tokenizer=TOKENIZER)
    assert not (root / "tokens.opt.npy").exists(), "a torn token cache would be loaded next time"
    monkeypatch.setattr(np, "save", real_save)
    corpus = load_corpus(tokenizer=TOKENIZER)
    assert "python3.11-doc reST sources (1 files" in corpus.description and corpus.tokens[-1] == EOS_ID
    assert corpus.path == root / "tokens.opt.npy" and np.array_equal(load_corpus().tokens, corpus.tokens)


@pytest.fixture
def tiny_corpus(tmp_path):
    tokens = np.random.default_rng(0).integers(3, 1000, size=3000).astype(np.uint16)
    path = tmp_path / "tiny.npy"
    np.save(path, tokens)
    return path


TINY = dict(steps=4, batch=2, seq_len=16, log_every=2, device="cpu")


def test_cached_checkpoint_without_its_record_is_incomplete(tmp_path, monkeypatch):
    """save_pretrained writes config.json first: the cache keys on pretrain.json, written last."""
    from longexposure import prepared
    from longexposure.pretrain import checkpoint_for

    monkeypatch.setenv("LONGEXPOSURE_CACHE", str(tmp_path))
    ckpt = tmp_path / "relu-micro"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")  # what an interrupted save leaves
    with pytest.raises(FileNotFoundError, match=r"incomplete \(interrupted\) save.*longexposure pretrain"):
        checkpoint_for("relu-micro")
    calls = []
    monkeypatch.setattr("longexposure.pretrain.pretrain", lambda preset, **kw: calls.append(kw["out"]))
    assert prepared.pretrained_weights("relu-micro", 3) == ckpt and calls == [ckpt], "pretrained again"
    (ckpt / "pretrain.json").write_text("{}")
    assert checkpoint_for("relu-micro") == ckpt


def test_an_interrupted_save_over_an_earlier_checkpoint_is_not_complete(tmp_path, tiny_corpus, monkeypatch):
    """Re-pretraining into a finished checkpoint drops its record first, so a save that dies is not complete."""
    from transformers import PreTrainedModel

    from longexposure.pretrain import checkpoint_for

    monkeypatch.setenv("LONGEXPOSURE_CACHE", str(tmp_path))
    out = tmp_path / "relu-micro"
    out.mkdir()
    for name in ("config.json", "pretrain.json"):  # an earlier, finished run
        (out / name).write_text("{}")
    assert checkpoint_for("relu-micro") == out

    def dies_after_config(self, directory, *args, **kwargs):
        self.config.save_pretrained(directory)
        raise OSError("No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", dies_after_config)
    with pytest.raises(OSError, match="No space"):
        pretrain("relu-micro", out=out, corpus=tiny_corpus, tokenizer=TOKENIZER, log=lambda *a: None, **TINY)
    assert (out / "config.json").exists()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        checkpoint_for("relu-micro")


def test_piped_pretrain_logs_a_line_every_n_steps_on_stderr(tmp_path, tiny_corpus, capsys):
    """CI / logs: stderr is no terminal, so progress is one flushed line every --log-every steps."""
    from longexposure.cli import main
    from longexposure.pretrain import is_complete

    out = tmp_path / "ckpt"
    args = ["pretrain", "--preset", "relu-micro", "--steps", "5", "--batch", "2", "--seq-len", "16", "--log-every"]
    args += ["2", "--corpus", str(tiny_corpus), "--tokenizer", TOKENIZER, "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    captured = capsys.readouterr()
    steps = [line.split()[1] for line in captured.err.splitlines() if line.startswith("step ")]
    assert steps == ["0", "2", "4"], captured.err
    assert "\r" not in captured.err and f"saved {out}" in captured.out and is_complete(out)


def test_pretrain_on_a_terminal_shows_a_bar(tmp_path, tiny_corpus):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    pretrain(
        "relu-micro",
        out=tmp_path / "ckpt",
        corpus=tiny_corpus,
        tokenizer=TOKENIZER,
        log=lambda *a: None,
        progress=term,
        **TINY,
    )
    shown = term.getvalue()
    assert "pretrain relu-micro" in shown and "4/4" in shown and "loss" in shown
    assert not any(line.startswith("step ") for line in shown.splitlines())


def test_group_lasso_term_makes_sequences_use_fewer_neurons(tmp_path):
    """act_group_l1 penalises each sequence's use of each neuron: with it, held-out sequences touch fewer
    neurons than the same short run without it (same seed, data and steps), and the recipe records it."""
    short = dict(steps=40, batch=4, seq_len=64, log_every=100, act_l1=0.0)
    per_seq = {}
    for group in (0.0, 3.0):
        ckpt = pretrain("relu-micro", out=tmp_path / f"g{group}", act_group_l1=group, log=lambda m: None, **short)
        record = json.loads((ckpt / "pretrain.json").read_text())
        assert record["recipe"]["act_group_l1"] == group
        per_seq[group] = np.mean([r["per_sequence_sparsity"] for r in record["mlp_sparsity_held_out"]])
    assert per_seq[3.0] > per_seq[0.0] + 0.05, per_seq
    from longexposure.models.factory import describe_weights

    assert "act_group_l1 3.0" in describe_weights(str(tmp_path / "g3.0"))
