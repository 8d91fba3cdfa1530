"""SP-LoRA's fused masked merge and backward (Triton, interpreted on CPU) against the torch reference."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from longexposure.kernels.masked_low_rank import masked_adapter_grads_restore_, masked_low_rank_add_
from numerics import assert_close, assert_close_to_reference

from longexposure.methods.sp_lora import SparseLoRALinear
from longexposure.ops.masked_low_rank import (
    masked_adapter_grads_restore_reference_,
    masked_low_rank_add_reference_,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the compiled kernels on a GPU, the interpreter on a CPU


def sparse_weight(out_f, in_f, density, gen, dtype):
    w = torch.randn(out_f, in_f, generator=gen)
    return (w * (torch.rand(out_f, in_f, generator=gen) < density)).to(dtype).to(DEVICE)


def adapters(out_f, in_f, rank, gen):
    return torch.randn(out_f, rank, generator=gen).to(DEVICE), torch.randn(rank, in_f, generator=gen).to(DEVICE)


shapes = dict(
    out_f=st.integers(1, 70),
    in_f=st.integers(1, 80),
    rank=st.integers(1, 40),  # crosses the kernel's 16-wide rank chunks
    density=st.sampled_from([0.0, 0.5, 1.0]),  # no entry kept, half, every entry kept
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    scale=st.floats(-4.0, 4.0),
    seed=st.integers(0, 2**16),
)


@given(**shapes)
@example(out_f=17, in_f=33, rank=16, density=0.5, dtype=torch.float32, scale=2.0, seed=0)
def test_merge_matches_reference_and_keeps_zeros(out_f, in_f, rank, density, dtype, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    w = sparse_weight(out_f, in_f, density, gen, dtype)
    up, down = adapters(out_f, in_f, rank, gen)
    zeros = w == 0
    got = masked_low_rank_add_(w.clone(), up, down, scale)
    if dtype == torch.float32:
        assert_close(got, masked_low_rank_add_reference_(w.clone(), up, down, scale), "merged weight")
    else:
        hi = masked_low_rank_add_reference_(w.double(), up.to(dtype).double(), down.to(dtype).double(), scale)
        same = masked_low_rank_add_reference_(w.clone(), up, down, scale)
        assert_close_to_reference(got, same, hi, "merged weight")
    assert (got[zeros] == 0).all(), "a pruned entry became non-zero"


@given(restore=st.booleans(), **shapes)
@example(restore=True, out_f=65, in_f=80, rank=33, density=0.5, dtype=torch.bfloat16, scale=1.0, seed=3)
def test_grads_and_restore_match_reference(restore, out_f, in_f, rank, density, dtype, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    w = sparse_weight(out_f, in_f, density, gen, dtype)
    up, down = adapters(out_f, in_f, rank, gen)
    merged = masked_low_rank_add_reference_(w.clone(), up, down, scale)
    g = torch.randn(out_f, in_f, generator=gen).to(dtype).to(DEVICE)
    w_kernel, w_ref = merged.clone(), merged.clone()
    d_up, d_down = masked_adapter_grads_restore_(g, w_kernel, up, down, scale, restore=restore)
    r_up, r_down = masked_adapter_grads_restore_reference_(g, w_ref, up, down, scale, restore=restore)
    assert d_up.dtype == d_down.dtype == torch.float32
    if dtype == torch.float32:
        assert_close(d_up, r_up, "d_up")
        assert_close(d_down, r_down, "d_down")
        assert_close(w_kernel, w_ref, "restored weight")
    else:
        # the kernel's fp32 products of the masked gradient against an fp64 evaluation of the same operands
        gm = (g * (merged != 0)).double()
        up_w, down_w = up.to(dtype).double(), down.to(dtype).double()
        hi_up, hi_down = scale * gm @ down_w.t(), scale * up_w.t() @ gm
        floor = 1e-5 * max(1.0, float(hi_up.abs().max()), float(hi_down.abs().max()))
        assert_close_to_reference(d_up, r_up, hi_up, "d_up", floor=floor)
        assert_close_to_reference(d_down, r_down, hi_down, "d_down", floor=floor)
        hi_w = masked_low_rank_add_reference_(merged.double(), up_w, down_w, -scale)
        assert_close_to_reference(w_kernel, w_ref, hi_w, "restored weight")
    if not restore:
        assert torch.equal(w_kernel, merged), "restore=False wrote the weight"
    assert (w_kernel[merged == 0] == 0).all()


def test_sp_lora_layer_backends_agree_and_say_which_ran():
    gen = torch.Generator().manual_seed(0)
    w = sparse_weight(48, 40, 0.5, gen, torch.float32)
    x = torch.randn(2, 5, 40, generator=gen).to(DEVICE)
    dy = torch.randn(2, 5, 48, generator=gen).to(DEVICE)
    results = {}
    for backend in ("triton", "torch"):
        layer = SparseLoRALinear(w.clone(), None, "sp-lora", rank=8, backend=backend)
        layer.lora_up.data = torch.randn(48, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        layer.lora_down.data = torch.randn(8, 40, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        xi = x.clone().requires_grad_()
        y = layer(xi)
        assert layer.backend_ran == backend
        y.backward(dy)
        results[backend] = (y.detach(), xi.grad, layer.lora_up.grad, layer.lora_down.grad, layer.weight.detach())
    for name, a, b in zip(("y", "dx", "d_up", "d_down", "restored weight"), *results.values(), strict=True):
        assert_close(a, b, name)
    assert_close(results["triton"][4], w, "weight after the step")


def test_bad_input_is_named():
    w = torch.randn(8, 12, device=DEVICE)
    up, down = torch.randn(8, 4, device=DEVICE), torch.randn(4, 12, device=DEVICE)
    with pytest.raises(ValueError, match="up must be"):
        masked_low_rank_add_(w, torch.randn(7, 4, device=DEVICE), down, 1.0)
    with pytest.raises(ValueError, match="down must be"):
        masked_low_rank_add_(w, up, torch.randn(3, 12, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="dtype"):
        masked_low_rank_add_(w.double(), up, down, 1.0)
    with pytest.raises(ValueError, match="grad must match"):
        masked_adapter_grads_restore_(torch.randn(8, 11, device=DEVICE), w, up, down, 1.0)
    with pytest.raises(ValueError, match="grad dtype"):
        masked_adapter_grads_restore_(w.bfloat16(), w, up, down, 1.0)
    with pytest.raises(ValueError, match="unknown SP-LoRA backend"):
        SparseLoRALinear(w, None, "sp-lora", backend="cuda")
    layer = SparseLoRALinear(w.double(), None, "sp-lora", rank=4, backend="triton")
    with pytest.raises(ValueError, match="supports weights in"):
        layer(torch.randn(3, 12, dtype=torch.float64, device=DEVICE))
