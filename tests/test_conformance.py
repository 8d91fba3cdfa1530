"""Conformance: every registered plug-in of every kind builds on a tiny model or input and keeps its kind's contract.

Entries come from the registries (`names()`), so a new plug-in is tested by being registered, and a new kind fails
`test_every_kind_has_a_contract` until it has one here. Only the project's own entries are listed (tests register
throwaway tasks). The deeper checks of one kind stay beside it (test_mlp_backends, test_attention_backends,
test_predictors, test_exposers, test_methods, test_sylva, test_sp_lora); these are the shared minimum.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_attention_backends import check_backend as check_attention_backend
from test_exposers import assert_block_ids, assert_causal_mask, random_mass
from test_mlp_backends import check_backend as check_mlp_backend

from longexposure.registry import ALL, registry

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TINY = "opt-tiny"  # ffn 256, 4 heads, d 64
MLP_BLOCK, ATTN_BLOCK, SEQ = 32, 16, 64

CONTRACTS: dict[str, Callable[[str], None]] = {}


def contract(kind: str):
    def add(fn: Callable[[str], None]) -> Callable[[str], None]:
        CONTRACTS[kind] = fn
        return fn

    return add


def _ours(obj: object) -> bool:
    module = getattr(obj, "__module__", None) or type(obj).__module__
    return module.startswith("longexposure.")


ENTRIES = [(kind, e.name) for kind in sorted(ALL) for e in registry(kind) if _ours(e.obj)]


def test_every_kind_has_a_contract():
    assert set(CONTRACTS) == set(ALL), f"kinds without a conformance contract: {sorted(set(ALL) - set(CONTRACTS))}"


@pytest.mark.parametrize(("kind", "name"), ENTRIES, ids=[f"{k}:{n}" for k, n in ENTRIES])
def test_every_registered_entry_keeps_its_contract(kind, name):
    CONTRACTS[kind](name)


def _ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- models
@contract("model_preset")
def _model_preset(name: str) -> None:
    """Builds (on the meta device: no memory) into its family's layout; a small one also runs a training step."""
    from longexposure.arch import FAMILIES, decoder_layers, family_of, resolve
    from longexposure.models import build_model
    from longexposure.registry import MODEL_PRESETS

    preset = MODEL_PRESETS.get(name)
    model = build_model(name, device="meta")
    assert family_of(model) == preset.family and preset.family in FAMILIES
    fam = FAMILIES[preset.family]
    layers = decoder_layers(model)
    assert len(layers) == model.config.num_hidden_layers > 0
    for path in (fam.attn, fam.q, fam.k, *((fam.mlp.fc1, fam.mlp.fc2, fam.mlp.act) if fam.mlp else ())):
        if path is not None:
            resolve(layers[0], path)  # every module the family table names is there
    names = [n for n, _ in model.named_modules()]
    assert all(any(n.endswith(p) for n in names) for p in fam.projections), f"{name}: a projection is missing"
    if sum(p.numel() for p in model.parameters()) < 10_000_000:
        model = build_model(name)
        model(input_ids=_ids(), labels=_ids()).loss.backward()


# ----------------------------------------------------------------------------------------------- methods
def _tiny_options(config: type | None) -> dict:
    """Options that keep a method's own preparation (Sylva's K-FAC preprocessing, adapter ranks) tiny."""
    from longexposure.methods.sp_lora import SpLoraConfig
    from longexposure.methods.sylva import SylvaConfig

    if config is not None and issubclass(config, SylvaConfig):
        return {"block": 16, "rank": 4, "levels": 2, "preprocess_batches": 1, "preprocess_batch": 1,
                "preprocess_seq_len": 16}  # fmt: skip
    return {"rank": 4} if config is SpLoraConfig else {}


@contract("peft_method")
def _peft_method(name: str) -> None:
    """Leaves trainable parameters (a strict subset unless `full`); gradients reach only those; a typed config
    is a frozen dataclass whose defaults build."""
    from longexposure.methods.builtin import apply_method_reporting
    from longexposure.models import build_model
    from longexposure.registry import PEFT_METHODS

    config = PEFT_METHODS.entry(name).meta.get("config")
    if config is not None:
        assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen
        config()
    options = _tiny_options(config)
    model, info = apply_method_reporting(build_model(TINY), name, **options)
    assert isinstance(info, dict)
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and (trainable == set(params) if name == "full" else trainable < set(params))
    loss = model(input_ids=_ids(), labels=_ids()).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n for n, p in params.items() if p.grad is not None}
    assert grads and grads <= trainable, f"{name}: gradients reached frozen {sorted(grads - trainable)[:3]}"


# ----------------------------------------------------------------------------------------------- data
def _dataset_options(name: str, tmp: Path) -> dict:
    if name == "e2e":
        if not (SHARED / "data" / "e2e").is_dir():
            pytest.skip("E2E data not in the shared directory")
        return {"path": str(SHARED / "data" / "e2e"), "family": "opt"}
    if name == "alpaca":
        if not (SHARED / "data" / "opt-tokenizer").is_dir():
            pytest.skip("the OPT tokenizer is not in the shared directory")
        (tmp / "alpaca.jsonl").write_text('{"instruction": "Name a colour.", "input": "", "output": "Blue."}\n' * 8)
        return {"path": str(tmp / "alpaca.jsonl"), "tokenizer": str(SHARED / "data" / "opt-tokenizer")}
    return {}


@contract("dataset")
def _dataset(name: str) -> None:
    """Fixed-shape {input_ids, labels} batches of in-vocabulary ids, and a description for artifacts."""
    import tempfile

    from longexposure.data import load_batches

    with tempfile.TemporaryDirectory() as tmp:
        batches = load_batches(name, batch=2, seq_len=16, vocab_size=50272, **_dataset_options(name, Path(tmp)))
        batch = next(batches)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 16)
    assert batch["input_ids"].dtype == torch.long and int(batch["input_ids"].min()) >= 0
    assert int(batch["input_ids"].max()) < 50272
    assert isinstance(batches.description, str) and batches.description


# ----------------------------------------------------------------------------------------------- backends
@contract("attention_backend")
def _attention_backend(name: str) -> None:
    """Matches the fp64 eager reference on a sparse causal layout, forward and (where it runs here) backward."""
    check_attention_backend(name, "longformer")


@contract("mlp_backend")
def _mlp_backend(name: str) -> None:
    """Matches the eager reference (output and every gradient, LoRA inside) on the blocks it computes."""
    check_mlp_backend(name)


# ----------------------------------------------------------------------------------------------- masks
@contract("mask_policy")
def _mask_policy(name: str) -> None:
    """A valid causal layout keeping every diagonal block, equal to the recipe's dense reference and to the mask of
    the exposer of the same name (one recipe behind both)."""
    from longexposure.exposers import make_exposer
    from longexposure.registry import EXPOSERS, MASK_POLICIES

    policy = MASK_POLICIES.get(name)()
    n = 7
    layout = policy.layout(2, 2, n * ATTN_BLOCK, ATTN_BLOCK)
    layout.validate(causal=True, canonical=True)
    dense = layout.to_dense()
    assert dense.shape == (2, 2, n, n) and dense.diagonal(dim1=-2, dim2=-1).all()
    if hasattr(policy, "reference"):
        assert torch.equal(dense, policy.reference(n).expand(2, 2, n, n))
    if name in EXPOSERS:
        exposed = make_exposer(name, "attention", block=ATTN_BLOCK).block_mask(random_mass(torch.Generator(), 2, 2, n))
        assert torch.equal(exposed, dense), f"exposer {name!r} and mask policy {name!r} disagree"


@contract("exposer")
def _exposer(name: str) -> None:
    """MLP: sorted unique int32 block ids; attention: a causal (B, H, N, N) bool mask keeping a block per row."""
    from longexposure.exposers import make_exposer
    from longexposure.registry import EXPOSERS

    served = EXPOSERS.entry(name).meta["target"]
    gen = torch.Generator().manual_seed(0)
    if served in ("mlp", "both"):
        _assert_mlp_format(
            make_exposer(name, "mlp", block_size=MLP_BLOCK)(torch.randn(2, 16, 256, generator=gen).relu())
        )
    if served in ("attention", "both"):
        q, k = (torch.randn(1, 2, SEQ, 16, generator=gen) for _ in range(2))
        _assert_attention_format(make_exposer(name, "attention", block=ATTN_BLOCK)(q, k), (1, 2))


def _assert_mlp_format(ids: torch.Tensor) -> None:
    """The neuron-block operator's format for opt-tiny's ffn (256): sorted unique int32 ids, at least one."""
    assert_block_ids(ids, 256 // MLP_BLOCK)
    assert ids.numel() >= 1


def _assert_attention_format(mask: torch.Tensor, batch_heads: tuple[int, int]) -> None:
    """A causal (B, H, N, N) bool block mask of a SEQ-token sequence keeping at least one block per query row."""
    n = SEQ // ATTN_BLOCK
    assert_causal_mask(mask, (*batch_heads, n, n))
    assert mask.any(-1).all()


# ----------------------------------------------------------------------------------------------- predictors
@contract("predictor")
def _predictor(name: str) -> None:
    """For each target it serves, on a layer of a tiny OPT: the operator's format (as the exposers give it)."""
    from longexposure.predictors.builtin import build_predictor

    from longexposure.models import build_model
    from longexposure.registry import PREDICTORS

    model = build_model(TINY, attn_implementation="eager").eval().requires_grad_(False)
    x = torch.randn(2, SEQ, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    for target in PREDICTORS.entry(name).meta["targets"]:
        torch.manual_seed(0)
        pred = build_predictor(name, model, 1, target=target, block_size=MLP_BLOCK, attn_block=ATTN_BLOCK, rank=4)
        with torch.no_grad():
            out = pred(x)
        if target == "mlp":
            _assert_mlp_format(out)
        else:
            _assert_attention_format(out, (2, model.config.num_attention_heads))


# ----------------------------------------------------------------------------------------------- tasks
@contract("task")
def _task(name: str) -> None:
    """A function of (case, ctx) with a typed case dataclass whose defaults build, run by a shipped suite (whose
    cases test_suite validates)."""
    import yaml

    from longexposure.registry import TASKS

    entry = TASKS.entry(name)
    assert dataclasses.is_dataclass(entry.meta["case"]) and isinstance(entry.meta["case"](), entry.meta["case"])
    assert len(inspect.signature(entry.obj).parameters) == 2
    tasks = {yaml.safe_load(p.read_text()).get("task") for p in (ROOT / "suites").glob("*.yaml")}
    assert name in tasks, f"task {name!r} is in no shipped suite"


# ------------------------------------------------------------------------------------------ sparsity sources
@contract("training_loss")
def _training_loss(name: str) -> None:
    """A scalar with gradients on every trainable parameter, equal to the model's own loss on the same batch."""
    from longexposure.methods.builtin import apply_method
    from longexposure.models import build_model
    from longexposure.registry import TRAINING_LOSSES

    torch.manual_seed(0)
    model = apply_method(build_model(TINY, attn_implementation="eager", dropout=0.0), "lora").train()
    ids = _ids(seq=SEQ)
    batch = {"input_ids": ids, "labels": ids}
    loss = TRAINING_LOSSES.get(name)(model, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        torch.testing.assert_close(loss.detach(), model(**batch, use_cache=False).loss, atol=1e-5, rtol=1e-5)


@contract("data_parallel")
def _data_parallel(name: str) -> None:
    """On a one-rank gloo group: the wrapped model's loss and every trainable gradient equal the model's own
    (torchrun's two-rank runs are tests/test_distributed.py)."""
    import copy
    import tempfile

    import torch.distributed as dist

    from longexposure.distributed import DataParallel, wrap
    from longexposure.methods.builtin import apply_method
    from longexposure.models import build_model

    torch.manual_seed(0)
    model = apply_method(build_model(TINY, attn_implementation="eager", dropout=0.0), "lora").train()
    ref = copy.deepcopy(model)
    ids = _ids(seq=SEQ)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp}/store")
        try:
            wrapped = wrap(model, DataParallel(0, 1, 0, "gloo"), torch.device("cpu"), name)
            loss = wrapped(input_ids=ids, labels=ids).loss
            loss.backward()
            ref_loss = ref(input_ids=ids, labels=ids).loss
            ref_loss.backward()
        finally:
            dist.destroy_process_group()
    torch.testing.assert_close(loss.detach(), ref_loss.detach())
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    expected = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == expected.keys() and expected
    for n, g in grads.items():
        whole = g.full_tensor() if hasattr(g, "full_tensor") else g
        torch.testing.assert_close(whole, expected[n], msg=n)


@contract("sparsity_source")
def _sparsity_source(name: str) -> None:
    """The entry says what ExposureConfig needs for it (missing: an error naming it) and whether it runs every
    step, which is what `Exposure.dynamic` does for it."""
    from longexposure.expose import ExposureConfig, expose
    from longexposure.models import build_model
    from longexposure.registry import SPARSITY_SOURCES

    source = SPARSITY_SOURCES.get(name)
    assert source.name == name
    for needed in source.requires:
        with pytest.raises(ValueError, match=needed.rstrip("s")):
            ExposureConfig(source=name)
    if source.requires:  # replay / predicted: their own tests build profiles and banks
        return
    model = build_model(TINY, attn_implementation="eager", activation_function="relu")
    opts = {
        "mlp_block": MLP_BLOCK,
        "attn_block": ATTN_BLOCK,
        "mlp_backend": "torch-gather",
        "attention_backend": "eager",
    }
    exposure = expose(model, source=name, **opts)
    assert exposure.dynamic == source.dynamic
    model(input_ids=_ids(seq=SEQ))
    assert name in exposure.report()["sparsity_source"]
