"""Conformance of every registered attention backend and mask policy, the no-fallback rule, the
transformers `long_exposure` integration, and the attention-operator task."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch
from numerics import assert_close

from longexposure.attention.pattern_pool import Atom
from longexposure.attention_backends import (
    SLOT_ATTR,
    attention,
    get_backend,
    register_transformers_attention,
    set_layout,
)
from longexposure.backends import BackendUnavailable
from longexposure.mask_policies import mask_layout
from longexposure.ops.block_sparse_attention import reference_attention
from longexposure.registry import ATTENTION_BACKENDS, MASK_POLICIES, RegistryError

B, H, S, D, BLOCK = 2, 2, 112, 16, 16  # 7 blocks: policies differ from dense at this size


def _inputs(seed: int, grad: bool):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, S, D, generator=gen).requires_grad_(grad) for _ in range(4)]


def _runs_backward(name: str) -> bool:
    try:
        get_backend(name).check(torch.device("cpu"), torch.float32, True)
    except BackendUnavailable:
        return False
    return True


@pytest.mark.parametrize(
    ("backend", "policy", "ragged"),
    list(itertools.product(ATTENTION_BACKENDS.names(), MASK_POLICIES.names(), [False, True])),
)
def test_every_backend_and_policy_match_the_reference(backend, policy, ragged):
    check_backend(backend, policy, ragged)


def check_backend(backend: str, policy: str, ragged: bool = False) -> None:
    """`backend` on `policy`'s layout against the fp64 eager reference: output, and every gradient where it runs
    backward here (test_conformance runs it for every registered backend too)."""
    layout = mask_layout(policy, B, H, S, BLOCK)
    layout.validate(causal=True, canonical=True)
    grad = _runs_backward(backend)
    q, k, v, do = _inputs(sum(map(ord, backend + policy)), grad)
    lens = torch.tensor([S, 70], dtype=torch.int32) if ragged else None
    out = attention(q, k, v, layout, backend=backend, causal=True, seq_lens=lens)
    hi = [t.detach().double().requires_grad_(grad) for t in (q, k, v)]
    ref = reference_attention(*hi, layout, causal=True, seq_lens=lens)
    assert_close(out, ref, f"{backend}/{policy} out")
    if grad:
        got = torch.autograd.grad(out, (q, k, v), do)
        want = torch.autograd.grad(ref, hi, do.double())
        for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
            assert_close(g, w, f"{backend}/{policy} {name}")


def test_policies_are_the_documented_atom_unions():
    n = S // BLOCK
    dense = mask_layout("dense", 1, 1, S, BLOCK).to_dense()[0, 0]
    assert torch.equal(dense, Atom.parse("full").dense(n))
    lf = mask_layout("longformer", 1, 1, S, BLOCK, window_blocks=2, global_blocks=1).to_dense()[0, 0]
    assert torch.equal(lf, Atom.parse("local-2").dense(n) | Atom.parse("global-1").dense(n))
    bb = mask_layout("bigbird", 1, 1, S, BLOCK, random_blocks=1, seed=3).to_dense()[0, 0]
    want = Atom.parse("local-3").dense(n) | Atom.parse("global-1").dense(n) | Atom.parse("random-1-s3").dense(n)
    assert torch.equal(bb, want)
    assert bool((bb != dense).any()) and bool((lf != dense).any())
    with pytest.raises(ValueError, match="window_blocks"):
        mask_layout("longformer", 1, 1, S, BLOCK, window_blocks=0)


def test_no_silent_fallback(monkeypatch):
    with pytest.raises(RegistryError, match="Did you mean 'triton'"):
        attention(*_inputs(0, False)[:3], backend="tritn")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="'triton' cannot run here: on CPU it needs the Triton interpreter"):
        get_backend("triton").check(torch.device("cpu"), torch.float32, False)
    with pytest.raises(BackendUnavailable, match="'flex' runs forward only on CPU"):
        get_backend("flex").check(torch.device("cpu"), torch.float32, True)
    with pytest.raises(BackendUnavailable, match="does not support torch.int32"):
        get_backend("sdpa").check(torch.device("cpu"), torch.int32, False)
    meta = ATTENTION_BACKENDS.entry("flex").meta
    assert meta["backward_devices"] == ("cuda",) and meta["sparse"] is True
    assert ATTENTION_BACKENDS.entry("triton").meta["devices"] == ("cuda", "cpu-interpret")


# ----------------------------------------------------------------------------------------- transformers


def _tiny_opt(attn: str):
    from transformers import AutoModelForCausalLM, OPTConfig

    cfg = OPTConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=attn)


def test_transformers_long_exposure_attention():
    register_transformers_attention()
    base, model = _tiny_opt("eager"), _tiny_opt("long_exposure")
    model.load_state_dict(base.state_dict())
    assert model.config._attn_implementation == "long_exposure"
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 48, dtype=torch.long)
    mask[1, 29:] = 0  # right padding
    want = base(ids, attention_mask=mask).logits
    got = model(ids, attention_mask=mask).logits  # no layout: the dense causal layout, triton kernel
    assert_close(got[0], want[0], "logits")
    assert_close(got[1, :29], want[1, :29], "padded row logits")

    attn = [layer.self_attn for layer in model.model.decoder.layers]
    layout = mask_layout("longformer", 1, 1, 48, 16, window_blocks=1, global_blocks=0)
    for module in attn:
        set_layout(module, layout, backend="triton")
    sparse = model(ids, attention_mask=mask).logits
    slot = getattr(attn[0], SLOT_ATTR)
    assert (slot.last_backend, slot.last_layout_source) == ("triton", "slot")
    assert not torch.allclose(sparse, got), "the layout must change the result"
    for module in attn:
        set_layout(module, layout, backend="eager")
    assert_close(sparse, model(ids, attention_mask=mask).logits, "slot layout, eager backend")
    per_layer = model(ids, attention_mask=mask, block_layout={0: layout, 1: layout}).logits
    assert_close(per_layer, sparse, "kwarg layouts by layer_idx")
    assert getattr(attn[1], SLOT_ATTR).last_layout_source == "kwarg-dict"
    sparse.sum().backward()
    assert attn[0].q_proj.weight.grad is not None and bool(attn[0].q_proj.weight.grad.abs().sum() > 0)

    left = torch.ones(2, 48, dtype=torch.long)
    left[1, :5] = 0
    with pytest.raises(RuntimeError, match="right padding only"):
        model(ids, attention_mask=left)
    with pytest.raises(RegistryError, match="unknown attention_backend"):
        set_layout(attn[0], layout, backend="nope")


# ------------------------------------------------------------------------------------------------ task


def test_attention_operator_task_runs_and_records_what_ran():
    from longexposure.registry import TASKS
    from longexposure.suite.config import load_suite
    from longexposure.suite.context import RunContext

    suite = load_suite(Path(__file__).parents[1] / "suites" / "fig12_attention.yaml")
    paper = suite.cases("paper")
    assert len(paper) == 60 and {c["backend"] for c in paper} == {"sdpa", "flex", "triton"}
    entry = TASKS.entry("attention-operator")
    ctx = RunContext(device=torch.device("cpu"), preset="cpu-tiny", out_dir=Path("."))
    case = entry.meta["case"](
        backend="triton",
        batch=1,
        heads=2,
        seq_len=64,
        head_dim=16,
        block=16,
        block_sparsity=0.5,
        dtype="float32",
        warmup=0,
        reps=1,
    )
    out = entry.obj(case, ctx)
    assert {"fwd_ms", "bwd_ms", "layout_build_ms", "density"} <= set(out)
    assert out["info"]["backend_ran"] == "TritonBlockSparseAttention(triton)"
    assert out["fwd_rel_err"] < 1e-5 and out["bwd_rel_err"] < 1e-5
    flex = entry.obj(
        entry.meta["case"](
            backend="flex", batch=1, heads=2, seq_len=64, head_dim=16, block=16, dtype="float32", warmup=0, reps=1
        ),
        ctx,
    )
    assert "bwd_ms" not in flex and flex["info"]["bwd"].startswith("not run: attention backend 'flex'")
    with pytest.raises(ValueError, match="block_sparsity"):
        entry.meta["case"](block_sparsity=1.0)
    from longexposure.tasks.attention_operator import build_case

    built = build_case(case, "cpu")
    grads = built.fwd_bwd()  # what the benchmark captures in a CUDA graph: grads at in-region views
    assert len(grads) == 3 and all(g.shape == (1, 2, 64, 16) for g in grads)
    assert built.build_layout().validate(causal=True, canonical=True).n_q_blocks == 4
