"""transformers' causal mask under CUDA-graph capture (see longexposure.hf_compat)."""

import pytest
import torch
from transformers.utils import import_utils

from longexposure.hf_compat import causal_mask_under_capture
from longexposure.models import build_model


def _masks_seen(model, ids) -> list:
    """The attention_mask each decoder layer's attention receives in one forward."""
    seen = []
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, args, kwargs: seen.append(kwargs.get("attention_mask")), with_kwargs=True
        )
        for layer in model.model.decoder.layers
    ]
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False).logits
    for h in hooks:
        h.remove()
    return seen, out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_captured_step_keeps_sdpas_causal_flag_and_eager_its_mask(monkeypatch, attn):
    model = build_model("opt-tiny", attn_implementation=attn, seed=0).eval()
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    outside, reference = _masks_seen(model, ids)
    monkeypatch.setattr(import_utils, "is_cuda_stream_capturing", lambda: True)  # as inside torch.cuda.graph
    # (transformers 5.17 builds a mask here for sdpa too; 5.25's OPT no longer does)
    with causal_mask_under_capture():
        fixed, out = _masks_seen(model, ids)
    torch.testing.assert_close(out, reference)  # the same function
    if attn == "sdpa":
        assert all(m is None for m in outside + fixed), "sdpa: no mask, its causal (flash) path"
    else:
        assert all(m is not None for m in fixed), "eager attention needs its mask: kept"


def test_the_mask_builder_is_restored_on_exit():
    import transformers.models.opt.modeling_opt as opt

    original = opt.create_causal_mask
    with causal_mask_under_capture():
        assert opt.create_causal_mask is not original
    assert opt.create_causal_mask is original
