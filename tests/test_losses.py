"""Training losses: the fused projection + cross-entropy against the materialized reference (values and both
gradients, over shapes, chunk sizes, dtypes and ignored tokens), and against each model's own loss."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longexposure.losses import IGNORE_INDEX, fused_linear_ce_loss, linear_cross_entropy, model_loss, reference_loss
from longexposure.methods.builtin import apply_method
from longexposure.models import build_model
from longexposure.registry import TRAINING_LOSSES, RegistryError


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 40),
    h=st.sampled_from([8, 16]),
    v=st.integers(2, 70),
    chunk=st.integers(1, 48),
    ignored=st.sampled_from(["none", "some", "all"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    weight_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_loss_and_gradients_match_the_materialized_logits(n, h, v, chunk, ignored, dtype, weight_grad, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_(True)
    weight = torch.randn(v, h, generator=gen).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, v, (n,), generator=gen)
    if ignored == "some":
        labels[torch.rand(n, generator=gen) < 0.3] = IGNORE_INDEX
    elif ignored == "all":
        labels[:] = IGNORE_INDEX
    loss = linear_cross_entropy(hidden, weight, labels, chunk=chunk)
    loss.backward()
    grads = hidden.grad.clone(), None if not weight_grad else weight.grad.clone()
    if ignored == "all":  # nothing to average: 0 and no gradient (the reference divides 0 by 0)
        assert loss.item() == 0 and not grads[0].any() and (grads[1] is None or not grads[1].any())
        return
    hidden.grad = None
    weight.grad = None
    ref = reference_loss(hidden.float(), weight.float(), labels)
    ref.backward()
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(grads[0].float(), hidden.grad.float(), **tol)
    assert grads[0].dtype == dtype
    if weight_grad:
        torch.testing.assert_close(grads[1].float(), weight.grad.float(), **tol)


@pytest.mark.parametrize(("preset", "method"), [("opt-tiny", "lora"), ("opt-tiny", "full"), ("gpt2-tiny", "lora"),
                                                ("llama-tiny", "lora")])  # fmt: skip
def test_fused_loss_equals_the_models_own_loss_and_gradients(preset, method):
    """Same value and parameter gradients as the model's forward with labels (tied embeddings included: `full`
    trains OPT's shared embedding / output projection through both uses)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 24))
    batch = {"input_ids": ids, "labels": ids.clone()}
    batch["labels"][0, :5] = IGNORE_INDEX
    results = []
    for loss_fn in (model_loss, fused_linear_ce_loss):
        no_dropout = {"dropout": 0.0} if preset == "opt-tiny" else {}  # OPT's dropout is functional
        model = build_model(preset, attn_implementation="eager", seed=0, **no_dropout)
        torch.manual_seed(0)
        model = apply_method(model, method).train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        loss = loss_fn(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys() and g0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_bad_input_and_unsupported_setups_are_clear_errors():
    with pytest.raises(ValueError, match="hidden .N, H., weight .V, H., labels"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk must be"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), chunk=0)
    model = apply_method(build_model("opt-tiny", attn_implementation="eager"), "p-tuning")
    ids = torch.randint(0, 1000, (1, 8))
    with pytest.raises(ValueError, match="prompt-learning"):
        fused_linear_ce_loss(model, {"input_ids": ids, "labels": ids})
    with pytest.raises(RegistryError, match="fused-linear-ce"):
        TRAINING_LOSSES.get("fused-ce")


def test_trainer_steps_with_the_fused_loss_train_like_the_models_loss():
    from longexposure.measure import Timer
    from longexposure.training import Trainer, TrainingSetup

    runs = {}
    for loss in ("model", "fused-linear-ce"):
        setup = TrainingSetup(model="opt-tiny", method="lora", batch=2, seq_len=32, precision="fp32", loss=loss,
                              method_options={"dropout": 0.0}, model_options={"dropout": 0.0})  # fmt: skip
        trainer = Trainer(setup, "cpu", seed=0)
        runs[loss] = [float(trainer.step(Timer("cpu"))) for _ in range(3)]
        assert trainer.describe()["training_loss"] == loss
    torch.testing.assert_close(torch.tensor(runs["fused-linear-ce"]), torch.tensor(runs["model"]), atol=1e-5, rtol=1e-5)
    with pytest.raises(RegistryError, match="training_loss"):
        TrainingSetup(loss="fused")


def test_a_loss_scale_over_few_tokens_keeps_fp16_gradients_finite():
    """fp16-amp scales the loss by up to 2**16; over one counted token the per-token factor must not pass
    through fp16 (its largest finite value is 65504)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 8, generator=gen).half().requires_grad_(True)
    weight = (0.01 * torch.randn(10, 8, generator=gen)).half()  # the scaled gradient itself fits in fp16
    labels = torch.tensor([3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX])
    (linear_cross_entropy(hidden, weight, labels) * 65536.0).backward()
    assert torch.isfinite(hidden.grad).all() and hidden.grad[0].abs().sum() > 0
