"""End-to-end patching: with every block active the exposed model is the dense model (loss and every
trainable gradient), for each architecture and PEFT method; replay applies real sparsity and says so."""

import pytest
import torch

from longexposure.expose import ExposureConfig, expose, unexpose
from longexposure.methods.builtin import apply_method
from longexposure.models import build_model
from longexposure.registry import RegistryError
from longexposure.replay import RecordedProfile

METHODS = ["lora", "adapter", "bitfit", "full", "p-tuning"]


def pair(arch, method, **options):
    """Two identical models (same seed) with the same method applied, in eval mode (no dropout)."""
    return [
        apply_method(build_model(arch, seed=1, attn_implementation="eager"), method, **options).eval() for _ in range(2)
    ]


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training_signal(ref, exposed, ids):
    l0, g0 = loss_and_grads(ref, ids)
    l1, g1 = loss_and_grads(exposed, ids)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys()
    scale = max(g.abs().max().item() for g in g0.values())
    for name in g0:
        err = (g0[name] - g1[name]).abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, f"{name}: gradient differs by {err:.3g} (largest gradient {scale:.3g})"


@pytest.mark.parametrize("method", METHODS)
def test_all_active_opt_equals_dense(method):
    ref, model = pair("opt-tiny", method)
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    exposure = expose(
        model, source="all-active", mlp_backend="triton", attention_backend="triton", attn_block=16, mlp_block=32
    )
    assert_same_training_signal(ref, model, ids)
    report = exposure.report()
    assert report["mlp_block_density"] == 1.0 and report["attention_block_density_of_causal"] == 1.0
    assert exposure.layers[0].self_attn.long_exposure_slot.last_backend == "triton"


@pytest.mark.parametrize("method", ["lora", "bitfit"])
def test_all_active_gpt2_attention_only_equals_dense(method):
    ref, model = pair("gpt2-tiny", method)
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    expose(model, source="all-active", mlp=False, attention_backend="triton", attn_block=16)
    assert_same_training_signal(ref, model, ids)


def test_lora_on_fc1_fc2_goes_through_the_operator():
    ref, model = pair("opt-tiny", "lora", target_modules=["fc1", "fc2"], r=4)
    for m in (ref, model):  # a non-zero B so the adapters change the output
        for name, p in m.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(2))
    expose(model, source="all-active", attention=False, mlp_backend="triton", mlp_block=32)
    assert_same_training_signal(ref, model, ids)


def tiny_profile(density=0.35, seed=0):
    gen = torch.Generator().manual_seed(seed)
    block_scale = (torch.rand(2, 8, generator=gen) ** 3).repeat_interleave(32, dim=1)
    mass = torch.rand(2, 256, generator=gen) * block_scale  # some neuron blocks carry most of the mass
    return RecordedProfile("synthetic test profile", mass, [density, density])


def test_replay_applies_sparsity_and_the_sparse_backends_agree_with_the_references():
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(3))
    ref, model = pair("opt-tiny", "lora")
    dense_loss, _ = loss_and_grads(ref, ids)
    common = dict(source="replay", profile=tiny_profile(), attn_block=16, mlp_block=32, theta=0.3)
    expose(ref, mlp_backend="torch-gather", attention_backend="eager", **common)
    exposure = expose(model, mlp_backend="triton", attention_backend="triton", **common)
    assert_same_training_signal(ref, model, ids)
    report = exposure.report()
    assert 0 < report["mlp_block_density"] < 1 and 0 < report["attention_block_density_of_causal"] < 1
    assert "replay: synthetic test profile (recorded, not predicted" in report["sparsity_source"]
    sparse_loss, _ = loss_and_grads(model, ids)
    assert not torch.allclose(sparse_loss, dense_loss), "replayed sparsity must change the computation"


def test_replayed_mlp_ids_share_one_shape_for_the_operator():
    """Issue 18: replayed layers keep different block counts; the Triton operator gets them padded to one
    capacity with the count on the device (one compiled program for every layer), torch-gather exact ids."""
    mass = torch.ones(2, 256)
    mass[0, :64] = 50.0  # layer 0: two hot blocks of 8; layer 1: every block alike
    profile = RecordedProfile("two layers, different counts", mass, [0.5, 0.5])
    common = dict(source="replay", profile=profile, attention=False, mlp_block=32, theta=0.3)
    shapes = {}
    for backend in ("triton", "torch-gather"):
        _, model = pair("opt-tiny", "lora")
        exposure = expose(model, mlp_backend=backend, **common)
        exposure.prepare(64, "cpu")
        entries = [state.cache[("mlp", torch.device("cpu"))] for state in exposure.layer_states]
        exact = [int(exposure.mlp_density[i] * 8) for i in range(len(entries))]
        assert len(set(exact)) > 1, "the test profile must give the layers different counts"
        if backend == "triton":
            assert {ids.shape for ids, _ in entries} == {(max(exact),)}
            assert [int(count) for _, count in entries] == exact
            for (ids, count), n in zip(entries, exact, strict=True):
                assert bool((ids[:n].diff() > 0).all()) and count.dtype == torch.int32
        else:
            assert [ids.numel() for ids, _ in entries] == exact and all(c is None for _, c in entries)
        shapes[backend] = [ids[: int(c) if c is not None else None].tolist() for ids, c in entries]
        if backend == "triton":  # a model that will not be compiled keeps exact lengths (less memory)
            exposure.prepare(64, "cpu", compiled=False)
            entries = [state.cache[("mlp", torch.device("cpu"))] for state in exposure.layer_states]
            assert [ids.numel() for ids, _ in entries] == exact and all(c is None for _, c in entries)
            out = model(input_ids=torch.randint(0, 1000, (1, 64))).logits
            assert torch.isfinite(out).all()
    assert shapes["triton"] == shapes["torch-gather"]  # the same blocks either way


def test_unexpose_restores_the_model():
    _, model = pair("opt-tiny", "bitfit")
    ids = torch.randint(0, 1000, (1, 32))
    before = model(input_ids=ids).logits
    names = [n for n, _ in model.named_parameters()]
    expose(
        model,
        source="replay",
        profile=tiny_profile(),
        attn_block=16,
        mlp_block=32,
        theta=0.5,
        mlp_backend="torch-gather",
        attention_backend="eager",
    )
    assert [n for n, _ in model.named_parameters()] == names
    assert not torch.allclose(model(input_ids=ids).logits, before)
    unexpose(model)
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="not exposed"):
        unexpose(model)


def test_bad_configurations_are_clear_errors():
    _, model = pair("gpt2-tiny", "lora")
    with pytest.raises(ValueError, match="MLP exposure needs a ReLU MLP"):
        expose(model, source="all-active")
    with pytest.raises(ValueError, match="needs a profile"):
        ExposureConfig(source="replay")
    with pytest.raises(ValueError, match="sparsity source 'guess'"):
        ExposureConfig(source="guess")
    _, opt = pair("opt-tiny", "lora")
    with pytest.raises(RegistryError, match="mlp_backend"):
        expose(opt, source="all-active", mlp_backend="cutlass")
    with pytest.raises(ValueError, match="does not match the model"):
        expose(opt, source="replay", profile=RecordedProfile("x", torch.rand(24, 8192), [0.1] * 24))
    expose(opt, source="all-active", mlp_backend="torch-gather", attention_backend="eager")
    with pytest.raises(ValueError, match="already exposed"):
        expose(opt, source="all-active")


def test_reference_profile_of_the_paper_artifact(tmp_path):
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared"
    if not (shared / "reference").is_dir():
        pytest.skip(f"paper artifact not found under {shared}")
    profile = RecordedProfile.from_reference(shared)
    assert tuple(profile.mlp_neuron_mass.shape) == (24, 8192) and len(profile.attn_density) == 24
    ids = profile.mlp_blocks(5, 64, 0.1)
    assert ids.dtype == torch.int32 and 0 < ids.numel() < 128 and torch.all(ids[1:] > ids[:-1])
    assert 1 <= profile.attention_window(0, 16) < 16
    profile.save(tmp_path / "p.json")
    again = RecordedProfile.load(tmp_path / "p.json")
    assert torch.equal(again.mlp_blocks(5, 64, 0.1), ids)


def test_replayed_attention_mixes_head_windows_to_the_recorded_density():
    """Issue 18: one window per layer moved density in whole diagonal bands, so every recorded density between
    two bands got the lower one; heads now mix the two windows around the target."""
    from longexposure.replay import _window_kept

    n, heads = 16, 8
    band1, band2 = (_window_kept(w, n, 1) / n**2 for w in (1, 2))
    targets = [band1, band1 + 0.3 * (band2 - band1), band1 + 0.75 * (band2 - band1), band2]
    profile = RecordedProfile("between bands", None, targets)
    for layer, target in enumerate(targets):
        windows = profile.attention_windows(layer, n, heads)
        mean = sum(_window_kept(w, n, 1) for w in windows) / heads / n**2
        assert abs(mean - target) <= (band2 - band1) / heads / 2 + 1e-9, (layer, windows)
        assert set(windows) <= {1, 2} and windows[0] >= windows[-1]
    assert profile.attention_windows(0, n, heads) == [1] * heads
    assert profile.attention_windows(3, n, heads) == [2] * heads
    # the exposure builds those per-head layouts: (1, H, NQ, NK), heads differing where the target lies between
    model = apply_method(build_model("opt-tiny", seed=1, attn_implementation="eager"), "lora").eval()
    two_layers = RecordedProfile("between bands", None, targets[1:3])
    exposure = expose(model, source="replay", profile=two_layers, mlp=False, attn_block=16, attention_backend="eager")
    exposure.prepare(n * 16, "cpu")
    for i, state in enumerate(exposure.layer_states):
        layout = state.cache[("attn", n * 16, torch.device("cpu"))]
        assert layout.heads == model.config.num_attention_heads and layout.batch == 1
        per_head = layout.to_dense().sum((-1, -2))[0]
        assert len(set(per_head.tolist())) == 2, f"layer {i}: heads should mix two windows"
        wanted = two_layers.attention_windows(i, n, model.config.num_attention_heads)
        assert per_head.tolist() == [_window_kept(w, n, 1) for w in wanted]


def test_prepare_builds_every_layer_pattern_once():
    model = apply_method(build_model("opt-tiny", seed=1, attn_implementation="eager"), "lora").eval()
    exposure = expose(
        model,
        source="replay",
        profile=tiny_profile(),
        attn_block=16,
        mlp_block=32,
        theta=0.3,
        mlp_backend="torch-gather",
        attention_backend="eager",
    )
    exposure.prepare(64, "cpu")
    n = len(exposure.layers)
    assert len(exposure.mlp_density) == n and len(exposure.attn_density) == n
    layouts = [exposure._layout(state, 64, torch.device("cpu")) for state in exposure.layer_states]
    assert all(layout.has_transpose for layout in layouts), "the backward's transpose is cached, not rebuilt"
    caches = lambda: {(s.index, k): v for s in exposure.layer_states for k, v in s.cache.items()}  # noqa: E731
    cached = caches()
    ids = torch.randint(0, 1000, (2, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    assert caches().keys() == cached.keys() and all(caches()[k] is cached[k] for k in cached)


def test_replay_resampled_to_another_depth_is_attention_only_and_says_so():
    profile = RecordedProfile("recorded", None, [0.2, 0.3, 0.5, 0.4])
    stretched = profile.resampled(7)
    assert stretched.attn_density[0] == pytest.approx(0.2) and stretched.attn_density[-1] == pytest.approx(0.4)
    assert stretched.attn_density[2] == pytest.approx(0.3) and stretched.attn_density[4] == pytest.approx(0.5)
    assert "resampled from 4 to 7 layers" in stretched.source
    model = apply_method(build_model("gpt2-tiny", seed=1, attn_implementation="eager"), "lora").eval()
    with pytest.raises(ValueError, match="attention densities for 4 layers"):
        expose(model, source="replay", profile=profile, mlp=False, attn_block=16, attention_backend="eager")
    exposure = expose(
        model, source="replay", profile=profile, mlp=False, resample=True, attn_block=16, attention_backend="eager"
    )
    ids = torch.randint(0, 1000, (2, 64))
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    assert "resampled from 4 to" in exposure.report()["sparsity_source"]
    assert profile.attn_density == [0.2, 0.3, 0.5, 0.4], "the caller's profile is not modified"


def _config(**fields):
    return ExposureConfig(source="all-active", attn_block=16, mlp_block=32, **fields)


def test_keyword_overrides_apply_to_a_given_config():
    """`expose(model, config, mlp=False)` exposed the MLP anyway: the keyword was dropped silently."""
    _, model = pair("opt-tiny", "lora")
    config = _config(mlp_backend="torch-gather", attention_backend="eager")
    exposure = expose(model, config, mlp=False)
    assert exposure.sources == {"attention": "all-active"} and exposure.report()["mlp_backend"] is None
    assert "forward" not in exposure.layers[0].fc1.__dict__, "fc1 must stay unpatched with mlp=False"
    assert config.mlp is True, "the caller's config is not modified"
    unexpose(model)
    with pytest.raises(ValueError, match="needs a profile"):  # overrides are validated like the config
        expose(model, config, source="replay")
    with pytest.raises(TypeError, match="no_such_field"):
        expose(model, config, no_such_field=1)


@pytest.fixture
def cpu_without_triton(monkeypatch):
    """A CPU without the Triton interpreter, as a newcomer's is (this test session runs under it)."""
    from longexposure.kernels import neuron_block_mlp as kernels

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(kernels, "INTERPRET", False)


def test_default_backends_on_a_cpu_without_triton_are_the_torch_ones_and_the_report_says_so(cpu_without_triton):
    """On a CPU the Triton defaults failed unless TRITON_INTERPRET=1; `auto` picks the torch backends."""
    ref, model = pair("opt-tiny", "lora")
    exposure = expose(model, _config())
    report = exposure.report()
    assert (report["mlp_backend"], report["attention_backend"]) == ("torch-gather", "sdpa")
    assert "mlp torch-gather (auto: not triton: mlp backend 'triton'" in report["backend_choice"]
    assert "attention sdpa (auto: not triton: attention backend 'triton'" in report["backend_choice"]
    assert "TRITON_INTERPRET=1" in report["backend_choice"], "the report says why Triton was not used"
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(4))
    assert_same_training_signal(ref, model, ids)
    assert exposure.layers[0].self_attn.long_exposure_slot.last_backend == "sdpa"


def test_a_named_triton_backend_never_falls_back(cpu_without_triton):
    """An explicit `triton` that cannot run is an error at expose, naming the cause; nothing is patched."""
    from longexposure.backends import BackendUnavailable

    _, model = pair("opt-tiny", "lora")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        expose(model, _config(mlp_backend="triton"))
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        expose(model, _config(attention_backend="triton", mlp=False))
    assert getattr(model, "long_exposure", None) is None
    fc1 = model.get_base_model().model.decoder.layers[0].fc1
    assert model.config._attn_implementation == "eager" and "forward" not in fc1.__dict__


def test_triton_stays_the_default_where_it_can_run():
    """Under the interpreter (as on a GPU) `auto` is Triton, and the report says it was the automatic choice."""
    _, model = pair("opt-tiny", "lora")
    report = expose(model, _config()).report()
    assert (report["mlp_backend"], report["attention_backend"]) == ("triton", "triton")
    auto = "(auto: Triton runs on cpu)"
    assert report["backend_choice"] == f"mlp triton {auto}; attention triton {auto}"
    _, named = pair("opt-tiny", "lora")
    named_report = expose(named, _config(mlp_backend="torch-gather", attention_backend="eager")).report()
    assert named_report["backend_choice"] is None, "named backends are not an automatic choice"


def test_replay_reordered_by_recorded_mass_is_exact_and_sparser():
    """`reorder`: the model's neurons are permuted by the profile's recorded mass (the same function), and the
    blocks holding 90% of the recorded mass are then far fewer than in the recorded order."""
    profile = RecordedProfile.from_reference()
    shape = dict(hidden_size=64, word_embed_proj_dim=64, num_attention_heads=4)  # OPT-1.3B's 24 layers, ffn 8192
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    densities = {}
    for reorder in (False, True):
        model = build_model("opt-1.3b", seed=0, attn_implementation="eager", **shape).eval()
        with torch.no_grad():
            before = model(input_ids=ids).logits
        exposure = expose(model, source="replay", profile=profile, attention=False, mlp_backend="torch-gather",
                          reorder=reorder, mlp_mass=0.9)  # fmt: skip
        exposure.prepare(32, "cpu")
        report = exposure.report()
        densities[reorder] = report["mlp_block_density"]
        unexpose(model)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-4, rtol=1e-4)
        assert ("permuted to that order" in report["sparsity_source"]) == reorder
    assert densities[True] < 0.5 * densities[False], densities
    with pytest.raises(ValueError, match="reorder and mlp_mass shape replayed MLP patterns"):
        ExposureConfig(source="oracle", reorder=True)
