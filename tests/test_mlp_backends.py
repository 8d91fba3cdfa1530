"""Conformance of every registered MLP backend: one shared correctness check, capabilities, no fallback."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close
from test_neuron_block_mlp import DEVICE, NAMES, make_problem, run

from longexposure.backends import BackendUnavailable
from longexposure.mlp_backends import capabilities
from longexposure.ops.neuron_block_mlp import LowRank, is_neuron_major, neuron_block_mlp_reference
from longexposure.registry import MLP_BACKENDS, RegistryError


def _backend_fn(name: str, block: int):
    """The backend behind the reference's call signature, prepared on the problem's own tensors."""

    def fn(x, ids, w1, b1, w2, b2, *, block_size, n_active=None, fc1_lora=None, fc2_lora=None):
        backend = MLP_BACKENDS.get(name)(block_size=block_size).prepare(w1, b1, w2, b2)
        return backend(x, ids, n_active, fc1_lora=fc1_lora, fc2_lora=fc2_lora)

    return fn


@pytest.mark.parametrize("name", MLP_BACKENDS.names())
@pytest.mark.parametrize("pattern", ["random", "all", "empty"])
@pytest.mark.parametrize("lora", [False, True])
def test_backend_matches_reference(name, pattern, lora):
    check_backend(name, pattern, lora)


def check_backend(name: str, pattern: str = "random", lora: bool = True) -> None:
    """Output and every gradient of backend `name` against the eager reference on one small problem (test_conformance
    runs it for every registered backend too)."""
    meta = capabilities(name)
    if not meta["uses_active_set"]:
        pattern = "all"  # the dense baseline computes every neuron
    p = make_problem(11, 27, 48, 4, 32, torch.float32, pattern=pattern, lora=lora, neuron_major=False)
    y, grads = run(p, _backend_fn(name, p.block))
    y_ref, g_ref = run(p.cast(torch.float32, DEVICE), neuron_block_mlp_reference)
    assert_close(y, y_ref, f"{name}: y")
    for n, g, r in zip(NAMES, grads, g_ref, strict=True):
        if r is not None:
            assert_close(g, r, f"{name}: grad {n}")


@pytest.mark.parametrize("name", MLP_BACKENDS.names())
def test_capabilities_are_declared(name):
    meta = capabilities(name)
    assert set(meta) >= {"devices", "dtypes", "supports_backward", "uses_active_set"}
    assert meta["supports_backward"] is True


def test_registered_names():
    assert {"dense", "torch-gather", "triton"} <= set(MLP_BACKENDS.names())
    with pytest.raises(RegistryError, match="Did you mean 'triton'"):
        MLP_BACKENDS.get("tritn")


def test_unavailable_backend_raises_instead_of_falling_back():
    triton_backend = MLP_BACKENDS.get("triton")(block_size=16)
    with pytest.raises(BackendUnavailable, match="supports"):
        triton_backend.check(DEVICE, torch.float64)
    with pytest.raises(BackendUnavailable, match="runs on"):
        triton_backend.check("meta", torch.float32)
    if DEVICE.type == "cpu":  # tests run the interpreter on a CPU, so CUDA tensors cannot run
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
            triton_backend.check("cuda", torch.float16)


def test_prepare_relays_fc2_in_place_and_gradients_reach_the_module():
    """A patching layer keeps nn.Linear modules: prepare keeps parameter identity, grads land in .grad."""
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(32, 64).to(DEVICE), torch.nn.Linear(64, 32).to(DEVICE)
    w2 = fc2.weight
    backend = MLP_BACKENDS.get("triton")(block_size=16).prepare(fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    assert fc2.weight is w2 and is_neuron_major(fc2.weight)
    x = torch.randn(5, 32, device=DEVICE)
    ids = torch.tensor([0, 2], dtype=torch.int32, device=DEVICE)
    backend(x, ids).sum().backward()
    assert fc2.weight.grad is not None and fc2.weight.grad.stride() == fc2.weight.stride()
    assert fc1.weight.grad[16:32].abs().max() == 0, "inactive block 1 must get a zero gradient"
    assert fc2.weight.grad[:, 16:32].abs().max() == 0 and fc2.weight.grad[:, :16].abs().max() > 0


@pytest.mark.parametrize("name", MLP_BACKENDS.names())
def test_prepare_on_weights_it_does_not_own_leaves_their_layout(name):
    """`in_place=False` (weights FSDP gathered into its own buffers): the backend makes its own layout, the
    tensors it was given keep theirs, and the gradient still reaches them."""
    torch.manual_seed(0)
    fc1, fc2 = torch.nn.Linear(32, 64).to(DEVICE), torch.nn.Linear(64, 32).to(DEVICE)
    x = torch.randn(5, 32, device=DEVICE)
    ids = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=DEVICE)
    backend = MLP_BACKENDS.get(name)(block_size=16).prepare(fc1.weight, fc1.bias, fc2.weight, fc2.bias, in_place=False)
    y = backend(x, ids)
    assert fc2.weight.is_contiguous(), "the given fc2 keeps its row-major layout"
    y.sum().backward()
    assert_close(y, fc2(torch.relu(fc1(x))), f"{name}: y")
    assert fc2.weight.grad is not None and fc2.weight.grad.abs().max() > 0


def test_lora_adapters_are_passed_not_wrapped():
    """LoRA goes through LowRank adapters; the same adapters give the same result on every backend."""
    p = make_problem(12, 9, 32, 4, 16, torch.float32, pattern="all", lora=True, requires_grad=False)
    a1, b1, a2, b2 = p.lora
    outs = []
    for name in MLP_BACKENDS.names():
        backend = MLP_BACKENDS.get(name)(block_size=16).prepare(p.w1, p.b1, p.w2, p.b2)
        outs.append(backend(p.x, p.ids, fc1_lora=LowRank(a1, b1, 0.5), fc2_lora=LowRank(a2, b2, 2.0)))
    for o in outs[1:]:
        assert_close(o, outs[0], "lora output")
