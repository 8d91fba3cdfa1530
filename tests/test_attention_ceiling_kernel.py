"""The tutorial-shaped forward of `benchmarks/attention_ceiling.py` computes causal attention.

Its timings are issue 21's Triton ceiling for the block-sparse forward, so every variant and tile it times must
compute what sdpa computes (the benchmark also checks this on the GPU before it times a config)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

triton = pytest.importorskip("triton")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_ceiling.py"
_spec = importlib.util.spec_from_file_location("attention_ceiling", _PATH)
ceiling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ceiling)


@pytest.fixture(autouse=True)
def _descriptor_scratch():
    from longexposure.kernels import descriptors

    triton.set_allocator(descriptors._scratch)


@given(variant=st.sampled_from([v for v in ceiling.VARIANTS if v != "tma+ws"]),
       tile=st.sampled_from([(64, 64), (128, 64), (64, 128), (128, 128)]),
       seq_tiles=st.integers(1, 2), d=st.sampled_from([16, 32]), heads=st.integers(1, 2), seed=st.integers(0, 99))
def test_every_variant_and_tile_matches_sdpa(variant, tile, seq_tiles, d, heads, seed):
    seq = seq_tiles * max(tile)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, seq, d, generator=gen) for _ in range(3))
    idx = torch.arange(seq // 64, dtype=torch.int32)
    out = ceiling.triton_causal(q, k, v, idx, (*tile, 4, 2), variant)()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_every_timed_variant_is_tested():
    # warp specialisation changes only the schedule Triton builds (the interpreter ignores it); the rest are above
    assert set(ceiling.VARIANTS) - {"tma+ws"} == {"plain", "indirect", "tma", "indirect+tma"}
