"""SP-LoRA / SPP: gradients against naive autograd, sparsity preserved through training and merge, pruning."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from numerics import assert_close

from longexposure.methods.builtin import apply_method
from longexposure.methods.pruning import nm_pattern_ok, parse_sparsity, prune_, prune_mask, weight_view
from longexposure.methods.sp_lora import VARIANTS, SparseLoRALinear, merge_
from longexposure.models import build_model


def pruned_weight(out_f, in_f, gen, dtype=torch.float64):
    w = torch.randn(out_f, in_f, generator=gen, dtype=dtype)
    return w * prune_mask(w.abs(), "2:4" if in_f % 4 == 0 else 0.5, per_row=False).to(dtype)


def run(layer, x, dy):
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


@given(
    out_f=st.integers(1, 24),
    in_f=st.sampled_from([4, 8, 12, 20]),
    rank=st.integers(1, 4),
    tokens=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_memory_optimised_gradients_equal_naive_autograd(out_f, in_f, rank, tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    w = pruned_weight(out_f, in_f, gen)
    x = torch.randn(2, tokens, in_f, generator=gen, dtype=torch.float64)
    dy = torch.randn(2, tokens, out_f, generator=gen, dtype=torch.float64)
    layers = {v: SparseLoRALinear(w.clone(), None, v, rank) for v in ("sp-lora", "sp-lora-no", "sp-lora-gc")}
    for layer in layers.values():  # identical non-zero adapters
        layer.lora_up.data = torch.randn(out_f, rank, generator=torch.Generator().manual_seed(seed), dtype=w.dtype)
        layer.lora_down.data = torch.randn(rank, in_f, generator=torch.Generator().manual_seed(seed + 1), dtype=w.dtype)
    ref_y, ref_dx, ref_g = run(layers["sp-lora-no"], x, dy)
    for v in ("sp-lora", "sp-lora-gc"):
        y, dx, g = run(layers[v], x, dy)
        assert_close(y, ref_y, f"{v} output")
        assert_close(dx, ref_dx, f"{v} dX")
        assert g.keys() == ref_g.keys() == {"lora_up", "lora_down"}
        for name in g:
            assert_close(g[name], ref_g[name], f"{v} d{name}")
    # the in-place merge was undone in backward (up to rounding of (w + d) - d) and zeros stayed zeros
    opt = layers["sp-lora"]
    assert not opt.merged
    assert_close(opt.weight, w, "restored weight")
    assert ((opt.weight == 0) == (w == 0)).all()


@given(out_f=st.integers(1, 16), in_f=st.sampled_from([4, 8, 12]), rank=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_spp_is_the_appendix_listing_and_gc_matches(out_f, in_f, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    w = pruned_weight(out_f, in_f, gen)
    x = torch.randn(3, in_f, generator=gen, dtype=torch.float64)
    dy = torch.randn(3, out_f, generator=gen, dtype=torch.float64)
    no, gc = SparseLoRALinear(w, None, "spp-no", rank), SparseLoRALinear(w, None, "spp-gc", rank)
    b = torch.randn(1, in_f, generator=gen, dtype=w.dtype)
    gc.spp_a.data, gc.spp_b.data, no.spp_b.data = no.spp_a.data.clone(), b.clone(), b.clone()
    # Listing 1, with column j of A chosen as floor(j r / in) (repeat_interleave when r divides in)
    a_rep = no.spp_a.detach()[:, (torch.arange(in_f) * rank) // in_f]
    expected = x @ (w + w * a_rep * b.expand(out_f, -1)).t()
    y_no, dx_no, g_no = run(no, x, dy)
    assert_close(y_no, expected, "SPP output")
    y_gc, dx_gc, g_gc = run(gc, x, dy)
    assert_close(y_gc, y_no, "SPP(GC) output")
    assert_close(dx_gc, dx_no, "SPP(GC) dX")
    for name in g_no:
        assert_close(g_gc[name], g_no[name], f"SPP(GC) d{name}")


@pytest.mark.parametrize("arch", ["opt-tiny", "llama-tiny"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_trains_and_pruned_entries_stay_zero_after_merge(arch, variant):
    model = apply_method(
        build_model(arch), variant, rank=4, prune="wanda", sparsity="2:4", calibration_samples=2, calibration_seq_len=16
    )
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SparseLoRALinear)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter = ("lora_up", "lora_down") if variant.startswith("sp-lora") else ("spp_a", "spp_b")
    assert trainable == {f"{n}.{a}" for n in layers for a in adapter}
    zeros = {n: m.weight.detach() == 0 for n, m in layers.items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(2):
        ids = torch.randint(0, 1000, (2, 8), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    for n, m in layers.items():
        assert ((m.weight == 0) == zeros[n]).all(), f"{n}: the frozen sparse weight changed its pattern"
    merge_(model)
    modules = dict(model.named_modules())
    for n, z in zeros.items():
        merged = weight_view(modules[n])
        assert (merged[z] == 0).all(), f"{n}: a pruned entry became non-zero after merge"
        assert nm_pattern_ok(merged)


def test_pruning_front_ends():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 16, generator=gen)
    keep = prune_mask(w.abs(), "2:4", per_row=False)
    assert nm_pattern_ok(w * keep) and int(keep.sum()) == 8 * 16 // 2
    keep = prune_mask(w.abs(), 0.75, per_row=True)
    assert (keep.sum(1) == 4).all()
    keep = prune_mask(w.abs(), 0.5, per_row=False)
    assert int(keep.sum()) == 64 and w.abs()[keep].min() >= w.abs()[~keep].max()
    assert parse_sparsity("2:4") == (0.5, (2, 4))
    for bad in ("4:2", "half", 1.0):
        with pytest.raises(ValueError, match="sparsity"):
            parse_sparsity(bad)
    model = build_model("opt-tiny")
    with pytest.raises(ValueError, match="wanda needs calibration"):
        prune_(model, "wanda", "2:4")
    with pytest.raises(ValueError, match="unknown pruning method"):
        prune_(model, "sparsegpt", "2:4")
    info = prune_(model, "magnitude", 0.5)
    assert abs(info["zero_fraction"] - 0.5) < 0.01
    with pytest.raises(ValueError, match="'sp-lora-gc': sparsity must be a ratio or 'N:M'"):  # SpLoraConfig checks
        apply_method(model, "sp-lora-gc", prune="magnitude", sparsity="half")  # before anything is pruned


def test_wanda_uses_input_norms():
    """A column with a huge input norm survives Wanda even where its weights are smallest."""
    model = build_model("opt-tiny")
    layer = model.model.decoder.layers[0].fc2
    with torch.no_grad():
        layer.weight[:, 0] = 1e-4
    calib = []

    def boost(_m, args):
        x = args[0].clone()
        x[..., 0] = 1e6
        return (x,)

    handle = layer.register_forward_pre_hook(boost)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    calib.append({"input_ids": ids})
    prune_(model, "wanda", "2:4", calib)
    handle.remove()
    assert (layer.weight[:, 0] != 0).all()
    assert nm_pattern_ok(layer.weight.detach())


def test_sp_lora_refuses_a_second_merge_and_restores():
    w = pruned_weight(6, 8, torch.Generator().manual_seed(0), torch.float32)
    layer = SparseLoRALinear(w.clone(), None, "sp-lora", 2)
    layer.lora_up.data.normal_()
    x = torch.randn(3, 8)
    layer(x)
    with pytest.raises(RuntimeError, match="forward called again before backward"):
        layer(x)
    layer.restore_()
    assert_close(layer.weight, w, "restored")
    with torch.no_grad():  # inference never merges in place
        y = layer(x)
    assert_close(layer.weight, w, "untouched by inference")
    assert_close(y, x @ layer.merged_weight().t(), "inference output")
