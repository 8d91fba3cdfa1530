import re

import pytest
import torch

from longexposure.methods.builtin import apply_method
from longexposure.models import build_model

# Expected trainable parameters per method and architecture, as name patterns.
EXPECTED = {
    "lora": r".*lora_[AB]\.default\.weight",
    "adapter": r".*(adapter\.(down|up)\.(weight|bias)|layer_norm\.(weight|bias)|ln_[12]\.(weight|bias)"
    r"|layernorm\.weight)",
    "bitfit": r".*\.bias",
    "p-tuning": r"prompt_encoder\..*",
}
ARCHS = ["opt-tiny", "gpt2-tiny", "llama-tiny"]


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["full", "lora", "adapter", "bitfit", "p-tuning"])
def test_each_method_trains_exactly_its_own_parameters(arch, method):
    if method == "bitfit" and arch == "llama-tiny":
        with pytest.raises(ValueError, match="no bias parameters"):
            apply_method(build_model(arch), method)
        return
    model = apply_method(build_model(arch), method)
    names = {n for n, _ in model.named_parameters()}
    train = trainable(model)
    assert train, f"{method} on {arch} trains nothing"
    if method == "full":
        assert train == names
    else:
        pattern = re.compile(EXPECTED[method])
        assert {n for n in names if pattern.fullmatch(n)} == train
        assert len(train) < len(names)
    ids = torch.randint(0, 1000, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    got_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got_grad == train, f"gradients reached {sorted(got_grad ^ train)[:4]}"


@pytest.mark.parametrize("arch", ["opt-tiny", "gpt2-tiny"])
def test_adapter_starts_as_identity_and_keeps_base_names(arch):
    base = build_model(arch, seed=0).eval()
    ids = torch.randint(0, 1000, (1, 10))
    expected = base(input_ids=ids).logits
    base_names = {n for n, _ in base.named_parameters()}
    adapted = apply_method(base, "adapter")
    assert base_names <= {n for n, _ in adapted.named_parameters()}
    torch.testing.assert_close(adapted(input_ids=ids).logits, expected)


def test_unknown_method_and_option_errors():
    from longexposure.registry import RegistryError

    with pytest.raises(RegistryError, match="Did you mean 'lora'"):
        apply_method(build_model("opt-tiny"), "loar")
    with pytest.raises(TypeError, match="PEFT method 'lora'"):
        apply_method(build_model("opt-tiny"), "lora", rank=4)
