"""Session fixtures: relu-micro pretrained briefly on the offline corpus, and E2E captures of it.

Import the fixtures into a test module (`from relu_fixture import micro_model, ...  # noqa: F401`);
pytest shares the session-scoped ones across modules, so the model is pretrained once per run.
The corpus is tokenized once into the user cache ($LONGEXPOSURE_CACHE or ~/.cache/longexposure); it
needs Debian's python3.11-doc (installed, or downloadable with apt-get; see longexposure.pretrain).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import SHARED

MICRO_STEPS = int(os.environ.get("LONGEXPOSURE_TEST_PRETRAIN_STEPS", "200"))
MLP_BLOCK = 32  # ffn 512 -> 16 neuron blocks
ATTN_BLOCK = 16  # seq 64 -> 4 query blocks
SEQ = 64


_PRETRAINED: dict[str, Path] = {}


@pytest.fixture(scope="session")
def micro_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A relu-micro checkpoint, pretrained for MICRO_STEPS steps of 8 x 64 tokens (under a minute).

    Cached per process: test modules that import this fixture each get their own fixture instance,
    but the pretraining runs once.
    """
    from longexposure.pretrain import pretrain

    if "micro" not in _PRETRAINED:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        os.environ.setdefault("LONGEXPOSURE_SHARED", str(Path(SHARED).resolve()))
        _PRETRAINED["micro"] = pretrain(
            "relu-micro",
            out=tmp_path_factory.mktemp("relu-micro"),
            steps=MICRO_STEPS,
            batch=8,
            seq_len=SEQ,
            warmup=20,
            log_every=50,
            log=lambda *a: None,
        )
    return _PRETRAINED["micro"]


@pytest.fixture(scope="session")
def micro_model(micro_checkpoint: Path) -> torch.nn.Module:
    from longexposure.models import build_model

    model = build_model("relu-micro", weights=str(micro_checkpoint), attn_implementation="eager").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def e2e_ids() -> list[torch.Tensor]:
    """Eight (2, 64) E2E token batches (held out from pretraining: a different corpus)."""
    from longexposure.data import load_batches

    data = load_batches(
        "e2e", batch=2, seq_len=SEQ, vocab_size=50272, path=os.path.join(SHARED, "data", "e2e"), family="opt"
    )
    return data.input_ids(8)


@pytest.fixture(scope="session")
def micro_layer_data(micro_model: torch.nn.Module, e2e_ids: list[torch.Tensor]):
    """(train, held-out) LayerData lists: 6 training batch units and 2 held-out ones, per layer."""
    from longexposure.predictors.offline import collect

    train = collect(micro_model, e2e_ids[:6], block_size=MLP_BLOCK, attn_block=ATTN_BLOCK)
    held_out = collect(micro_model, e2e_ids[6:], block_size=MLP_BLOCK, attn_block=ATTN_BLOCK)
    return train, held_out
