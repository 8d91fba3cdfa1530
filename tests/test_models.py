import pytest
import torch

from longexposure.arch import FAMILIES
from longexposure.models import build_model, family_of
from longexposure.models.factory import preset_config
from longexposure.registry import MODEL_PRESETS, RegistryError

TINY = ["opt-tiny", "gpt2-tiny", "llama-tiny", "relu-micro"]


@pytest.mark.parametrize("preset", TINY)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tiny_presets_build_and_take_a_training_step(preset, attn):
    model = build_model(preset, attn_implementation=attn)
    assert model.config._attn_implementation == attn
    assert model.config.longexposure_weights == "random-init"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 1000, (2, 24))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    before = next(model.parameters()).detach().clone()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, next(model.parameters()))


def test_same_seed_same_weights():
    a, b = build_model("opt-tiny", seed=3), build_model("opt-tiny", seed=3)
    c = build_model("opt-tiny", seed=4)
    pa, pb, pc = (dict(m.named_parameters())["model.decoder.layers.0.fc1.weight"] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


@pytest.mark.parametrize(
    "preset, params",
    [("opt-350m", 331e6), ("opt-1.3b", 1.316e9), ("opt-2.7b", 2.65e9), ("gpt2-large", 774e6), ("gpt2-xl", 1.558e9)],
)
def test_paper_presets_have_the_published_sizes(preset, params):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(preset_config(preset))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.02, f"{preset}: {n / 1e6:.0f}M parameters"


def test_family_of_rejects_other_architectures():
    assert family_of(build_model("gpt2-tiny")) == "gpt2"
    with pytest.raises(ValueError, match="unsupported model type"):
        family_of(torch.nn.Linear(2, 2))


def test_unknown_preset_and_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(RegistryError, match="Did you mean 'opt-1.3b'"):
        build_model("opt-13b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_model("opt-tiny", weights=str(tmp_path / "missing"))


def test_loads_a_local_checkpoint_with_from_pretrained(tmp_path):
    model = build_model("opt-tiny", seed=1)
    model.save_pretrained(tmp_path)
    loaded = build_model(str(tmp_path))
    assert loaded.config.longexposure_weights == str(tmp_path)
    ids = torch.randint(0, 1000, (1, 8))
    model.eval(), loaded.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_every_preset_names_a_known_family():
    for entry in MODEL_PRESETS:
        assert entry.obj.family in FAMILIES



def test_hub_id_offline_is_one_line_naming_what_to_pass(monkeypatch):
    """A name with `/` goes to the Hugging Face hub. Offline, that was ~50 s of retries and transformers'
    paragraph; it must be a prompt one-line error saying so and naming the alternatives (a local checkpoint, the
    presets)."""
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: an unreachable hub
    with pytest.raises(FileNotFoundError) as err:
        build_model("longexposure-test/no-such-model")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("model 'longexposure-test/no-such-model' is not a local path and the hub cannot be reached")
    assert "pass a local checkpoint directory or one of the presets: " in msg and "opt-1.3b" in msg.split("presets:")[1]


def test_hub_id_online_says_it_goes_to_the_hub(monkeypatch, caplog):
    """Loading a hub id is still possible, but it is the one download at run time: it is logged."""
    import transformers

    from longexposure.models import factory

    def missing(*args, **kwargs):
        raise OSError("longexposure-test/no-such-model is not a valid model identifier listed on the hub")

    monkeypatch.setattr(factory, "_hub_reachable", lambda: True)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", missing)
    with pytest.raises(FileNotFoundError, match="is not a local path and loading it from the hub failed"):
        build_model("longexposure-test/no-such-model")
    assert "'longexposure-test/no-such-model' is not a local path: loading it from the Hugging Face hub" in caplog.text
