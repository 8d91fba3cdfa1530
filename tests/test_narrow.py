"""Narrowed MLPs (the ideal-operator yardstick): same function as masking the dropped neurons, clear refusals."""

import copy

import pytest
import torch

from longexposure.models import build_model
from longexposure.narrow import narrow_mlp_
from longexposure.profiling import decoder_layers
from longexposure.replay import RecordedProfile
from longexposure.training import Trainer, TrainingSetup

BLOCK = 32  # opt-tiny: ffn 256 = 8 blocks


@pytest.fixture(scope="module")
def tiny():
    return build_model("opt-tiny", attn_implementation="eager", device="cpu", seed=0).eval()


def _masked(model, keep):
    """The reference: the dropped neurons' fc2 columns zeroed, so they add nothing after the ReLU."""
    ref = copy.deepcopy(model)
    for layer, ids in zip(decoder_layers(ref), keep, strict=True):
        cols = torch.zeros(layer.fc1.out_features, dtype=torch.bool)
        for b in ids.tolist():
            cols[b * BLOCK : (b + 1) * BLOCK] = True
        with torch.no_grad():
            layer.fc2.weight[:, ~cols] = 0
    return ref


@pytest.mark.parametrize(
    "keep",
    [
        [torch.tensor([0, 3, 7]), torch.tensor([2])],  # a few blocks
        [torch.arange(8), torch.arange(8)],  # all of them
        [torch.tensor([], dtype=torch.int32), torch.tensor([5, 6])],  # none in one layer
    ],
    ids=["some", "all", "none"],
)
def test_narrowed_model_computes_the_masked_mlp(tiny, keep):
    ids = torch.randint(0, tiny.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    want = _masked(tiny, keep)(input_ids=ids).logits
    model = copy.deepcopy(tiny)
    widths = narrow_mlp_(model, keep, BLOCK)
    assert widths == [k.numel() * BLOCK for k in keep]
    assert [layer.fc1.out_features for layer in decoder_layers(model)] == widths
    torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)


def test_bad_requests_are_refused_and_leave_the_model_unchanged(tiny):
    model = copy.deepcopy(tiny)
    with pytest.raises(ValueError, match="2 layers"):
        narrow_mlp_(model, [torch.tensor([0])], BLOCK)
    with pytest.raises(ValueError, match=r"layer 1: block ids must lie in \[0, 8\)"):
        narrow_mlp_(model, [torch.tensor([0]), torch.tensor([8])], BLOCK)
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        narrow_mlp_(model, [torch.tensor([0]), torch.tensor([0])], 48)
    assert [layer.fc1.out_features for layer in decoder_layers(model)] == [256, 256]
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(TypeError, match="before applying a PEFT method"):
        narrow_mlp_(wrapped, [torch.tensor([0]), torch.tensor([1])], BLOCK)


def test_trainer_narrows_from_a_profile_and_says_so(tmp_path):
    mass = torch.zeros(2, 256)
    mass[0, :BLOCK] = 1.0  # layer 0 keeps block 0
    mass[1, 3 * BLOCK : 5 * BLOCK] = 1.0  # layer 1 keeps blocks 3 and 4
    path = tmp_path / "profile.json"
    RecordedProfile("test profile", mass, [0.5, 0.5]).save(path)
    setup = TrainingSetup(
        model="opt-tiny", method="lora", batch=2, seq_len=16, precision="fp32",
        narrow_mlp={"profile": str(path), "theta": 0.5, "block": BLOCK},
    )  # fmt: skip
    trainer = Trainer(setup, "cpu")
    from longexposure.measure import Timer

    loss = trainer.step(Timer(torch.device("cpu")))
    assert torch.isfinite(loss)
    layers = decoder_layers(trainer.model)
    assert [layer.fc1.base_layer.out_features if hasattr(layer.fc1, "base_layer") else layer.fc1.out_features
            for layer in layers] == [BLOCK, 2 * BLOCK]  # fmt: skip
    info = trainer.describe()
    assert "speed yardstick, not a method" in info["mlp_narrowed"] and "test profile" in info["mlp_narrowed"]
    assert info["mlp_density_per_layer"] == {"0": 0.125, "1": 0.25}
    assert "narrowed" in info["sparsity_source"]


def test_narrowing_needs_a_relu_opt_model_and_a_matching_profile(tiny):
    from longexposure.narrow import narrow_to_profile_

    gpt2 = build_model("gpt2-tiny", attn_implementation="eager", device="cpu", seed=0)
    profile = RecordedProfile("two layers of ffn 256", torch.ones(2, 256), [0.5, 0.5])
    with pytest.raises(ValueError, match="profiling supports model types"):
        narrow_to_profile_(gpt2, profile, 0.1, BLOCK)
    with pytest.raises(ValueError, match="does not match the model"):
        narrow_to_profile_(copy.deepcopy(tiny), RecordedProfile("wide", torch.ones(2, 512), [0.5, 0.5]), 0.1, BLOCK)
    assert narrow_to_profile_(copy.deepcopy(tiny), profile, 0.1, BLOCK) == [1.0, 1.0]


def test_narrowing_refuses_an_exposed_mlp_and_unknown_options():
    with pytest.raises(ValueError, match="mlp: false"):
        TrainingSetup(narrow_mlp={"profile": "reference"}, exposure={"source": "replay", "profile": "reference"})
    with pytest.raises(ValueError, match="narrow_mlp takes profile"):
        TrainingSetup(narrow_mlp={"profile": "reference", "density": 0.5})
