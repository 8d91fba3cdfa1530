from pathlib import Path

import pytest
import torch

from longexposure.data import load_batches
from longexposure.registry import RegistryError

E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"
needs_e2e = pytest.mark.skipif(not E2E.is_dir(), reason=f"E2E data not found at {E2E}")


def test_synthetic_is_seeded_and_shaped():
    a = next(load_batches("synthetic", batch=3, seq_len=16, vocab_size=100, seed=1))
    b = next(load_batches("synthetic", batch=3, seq_len=16, vocab_size=100, seed=1))
    assert a["input_ids"].shape == (3, 16) and torch.equal(a["input_ids"], b["input_ids"])
    assert int(a["input_ids"].max()) < 100


@needs_e2e
@pytest.mark.parametrize("family, eos", [("opt", 2), ("gpt2", 50256)])
def test_e2e_packs_the_family_tokenization(family, eos):
    batches = load_batches("e2e", batch=2, seq_len=128, vocab_size=50272, path=str(E2E), family=family)
    assert f"valid_{'gpt' if family == 'gpt2' else 'opt'}.jsonl" in batches.description
    ids = next(batches)["input_ids"]
    assert ids.shape == (2, 128)
    assert (ids == eos).any(), "packed windows should contain example boundaries"


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_batches("e2e", batch=1, seq_len=8, vocab_size=10, path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(RegistryError, match="Valid dataset names"):
        load_batches("e3e", batch=1, seq_len=8, vocab_size=10)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": [1, 2]}\n')
    with pytest.raises(ValueError, match="expected keys 'context' and 'completion'"):
        load_batches("e2e", batch=1, seq_len=8, vocab_size=10, path=str(bad))
    big = tmp_path / "big.jsonl"
    big.write_text('{"context": [1, 2, 3, 4, 5], "completion": [99, 7, 8, 9, 10]}\n' * 4)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        next(load_batches("e2e", batch=1, seq_len=8, vocab_size=50, path=str(big)))


def test_e2e_without_a_path_needs_the_shared_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGEXPOSURE_SHARED", str(tmp_path))  # a shared directory without data/e2e
    with pytest.raises(ValueError, match="needs a path"):
        load_batches("e2e", batch=1, seq_len=8, vocab_size=10)


@needs_e2e
def test_e2e_defaults_to_the_shared_copy(monkeypatch):
    monkeypatch.setenv("LONGEXPOSURE_SHARED", str(E2E.parents[1]))
    batches = load_batches("e2e", batch=2, seq_len=64, vocab_size=50272, family="opt")
    assert next(batches)["input_ids"].shape == (2, 64) and "valid_opt.jsonl" in batches.description


TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "opt-tokenizer"


@pytest.mark.skipif(not TOKENIZER.is_dir(), reason=f"OPT tokenizer not found at {TOKENIZER}")
def test_alpaca_tokenizes_instruction_input_output(tmp_path):
    file = tmp_path / "alpaca.jsonl"
    file.write_text('{"instruction": "Name a colour.", "input": "", "output": "Blue."}\n' * 20)
    batches = load_batches("alpaca", batch=2, seq_len=16, vocab_size=50272, path=str(file), tokenizer=str(TOKENIZER))
    ids = next(batches)["input_ids"]
    assert ids.shape == (2, 16) and (ids == 2).any()  # OPT's </s> closes each example
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    with pytest.raises(ValueError, match="expected keys 'instruction' and 'output'"):
        load_batches("alpaca", batch=1, seq_len=8, vocab_size=10, path=str(bad), tokenizer=str(TOKENIZER))


def _corpus(tmp_path, n=5000):
    """A tokenized corpus whose token at position i is i % 50000: a window's ids say where it was cut."""
    import numpy as np

    path = tmp_path / "corpus.npy"
    np.save(path, (np.arange(n) % 50000).astype(np.uint16))
    return path


def test_corpus_splits_as_pretraining_does(tmp_path):
    from longexposure.pretrain import load_corpus

    path = _corpus(tmp_path)
    train_tokens, tail = load_corpus(path).split()
    for split, lo, hi in (("train", 0, len(train_tokens)), ("held-out", len(train_tokens), 5000)):
        batches = load_batches("corpus", batch=4, seq_len=16, vocab_size=50272, path=str(path), split=split)
        assert f"split {split}" in batches.description
        for _ in range(8):
            ids = next(batches)["input_ids"]
            assert ids.shape == (4, 16)
            assert bool(((ids[:, 1:] - ids[:, :-1]) == 1).all()), "a window is a contiguous run of the stream"
            assert int(ids.min()) >= lo and int(ids.max()) < hi, f"{split} windows stay inside their split"
    assert len(tail) == 5000 - len(train_tokens) > 0
    default = load_batches("corpus", batch=1, seq_len=16, vocab_size=50272, path=str(path), seed=3)
    again = load_batches("corpus", batch=1, seq_len=16, vocab_size=50272, path=str(path), seed=3, split="train")
    assert torch.equal(next(default)["input_ids"], next(again)["input_ids"]), "train is the default, seeded"


def test_corpus_bad_inputs_are_clear_errors(tmp_path):
    path = str(_corpus(tmp_path))
    with pytest.raises(ValueError, match="corpus split 'valid' is not one of"):
        load_batches("corpus", batch=1, seq_len=16, vocab_size=50272, path=path, split="valid")
    with pytest.raises(ValueError, match="OPT tokenizer"):
        load_batches("corpus", batch=1, seq_len=16, vocab_size=50272, path=path, family="llama")
    with pytest.raises(ValueError, match="fewer than one window"):
        load_batches("corpus", batch=1, seq_len=512, vocab_size=50272, path=path, split="held-out")
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        load_batches("corpus", batch=1, seq_len=16, vocab_size=1000, path=path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_batches("corpus", batch=1, seq_len=16, vocab_size=50272, path=str(tmp_path / "none.npy"))
