"""Data-parallel fine-tuning under torchrun (gloo, 2 CPU ranks), DDP and FSDP: the gradients equal a
single-process run's with the same global batch, for the dense model and with Long Exposure's static patterns
(under FSDP also with LoRA on the MLP, whose factors the exposed MLP reads from the gathered parameters).
Trained parameters are not compared: Adam moves a weight by about lr whatever its gradient's size, so
rounding-level differences (the all-reduce sums in another order) flip the updates of near-zero gradients.
(Each rank's loss is its slice's, not the global batch's, so losses are not compared either.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longexposure.distributed import DataParallel, shard

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ddp_worker import train  # noqa: E402


def _two_ranks(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS...` on the CPU (gloo); it must succeed."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.setdefault("LONGEXPOSURE_SHARED", str(HERE.parents[1] / "shared"))
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _torchrun(kind: str, out: Path, per_rank: int = 2, steps: int = 3, engine: str = "ddp") -> tuple[dict, dict]:
    _two_ranks(str(HERE / "ddp_worker.py"), "--kind", kind, "--batch", str(per_rank), "--steps", str(steps),
               "--engine", engine, "--out", str(out))  # fmt: skip
    return torch.load(out, weights_only=True), json.loads(Path(str(out) + ".json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine, kind",
    [("ddp", "dense"), ("ddp", "all-active"), ("ddp", "replay"), ("fsdp", "dense"), ("fsdp", "all-active-mlp-lora"),
     ("fsdp", "replay")],
)  # fmt: skip
def test_two_ranks_train_what_one_process_trains_on_the_global_batch(tmp_path, engine, kind, monkeypatch):
    monkeypatch.setenv("LONGEXPOSURE_SHARED", str(HERE.parents[1] / "shared"))
    ranks, record = _torchrun(kind, tmp_path / "ranks.pt", engine=engine)
    # one thread, like each rank (OMP_NUM_THREADS=1): the replay model's 24 random layers amplify the rounding of
    # another GEMM blocking to 0.5% of a gradient, while the same blocking agrees to 1e-6
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single, _, info = train(kind, batch=4, steps=3)
    finally:
        torch.set_num_threads(threads)
    assert record["data_parallel"].startswith(f"{engine.upper()} over 2 ranks (gloo)"), record
    assert info.get("data_parallel") is None
    assert ranks.keys() == single.keys() and single
    assert all(g.abs().sum() > 0 for n, g in single.items() if "lora_B" in n), "every LoRA B gets a gradient"
    for name in single:
        torch.testing.assert_close(ranks[name], single[name], atol=1e-6, rtol=1e-4)
    assert len(record["losses"]) == 3 and all(v == v for v in record["losses"]), "the DDP steps run"


def test_fsdp_refuses_what_it_does_not_combine_with_and_unknown_engines_are_named():
    from longexposure.training import TrainingSetup

    refresh = {"exposure": {"source": "predicted", "refresh_every": 5}}
    for bad, named in (({"cuda_graph": True}, "cuda_graph"), ({"compile": True}, "compile"),
                       (refresh, "exposure.refresh_every")):  # fmt: skip
        with pytest.raises(ValueError, match=f"'fsdp' does not combine with {named}"):
            TrainingSetup(data_parallel="fsdp", **bad)
    with pytest.raises(LookupError, match="unknown data_parallel 'zero3'.*Valid data_parallel names: ddp, fsdp"):
        TrainingSetup(data_parallel="zero3")


def test_shard_takes_each_ranks_contiguous_rows_and_refuses_an_uneven_split():
    batch = {"input_ids": torch.arange(12).view(4, 3)}
    halves = [shard(batch, DataParallel(r, 2, r, "gloo"))["input_ids"] for r in range(2)]
    torch.testing.assert_close(torch.cat(halves), batch["input_ids"])
    with pytest.raises(ValueError, match="does not split over 3 ranks"):
        shard(batch, DataParallel(0, 3, 0, "gloo"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_finetune_under_torchrun_writes_once_from_rank_0(tmp_path, engine):
    done = _two_ranks("-m", "longexposure", "finetune", "--model", "opt-tiny", "--batch", "2", "--seq-len", "32",
                      "--steps", "3", "--device", "cpu", "--data-parallel", engine,
                      "--out", str(tmp_path / "run"))  # fmt: skip
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["info"]["data_parallel"].startswith(
        f"{engine.upper()} over 2 ranks (gloo), per-rank batch 2, global batch 4"
    )
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    a = [t for n, t in saved.items() if "lora_A" in n]
    b = [t for n, t in saved.items() if "lora_B" in n]
    assert a and len(a) == len(b), sorted(saved)
    assert all(t.shape[0] == 8 for t in a) and all(t.shape[1] == 8 for t in b), "whole factors (r 8), not shards"
    assert all(t.abs().max() > 0 for t in b), "B starts at zero: trained values were saved"
    assert done.stdout.count("final loss") == 1, "one summary line, from rank 0"


@pytest.mark.slow
def test_a_suite_under_torchrun_runs_the_two_rank_cases_and_rank_0_writes_once(tmp_path):
    _two_ranks("-m", "longexposure", "run", str(HERE.parent / "suites" / "fig14.yaml"), "--preset", "cpu-tiny",
               "--only", "gpus=2", "--device", "cpu", "--out", str(tmp_path))  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "fig14" / "cpu-tiny" / "results.jsonl").read_text().splitlines()]
    variants = {r["case"]["variant"]: r for r in rows}
    assert sorted(r["case"]["variant"] for r in rows) == ["dense-sdpa", "long-exposure", "long-exposure-fsdp"]
    for name, row in variants.items():
        engine = "FSDP" if name.endswith("fsdp") else "DDP"
        assert row["info"]["data_parallel"].startswith(f"{engine} over 2 ranks (gloo)"), row["info"]
    assert all(r["metrics"]["tokens_per_s"] == pytest.approx(2 * r["metrics"]["tokens_per_s_per_gpu"]) for r in rows)
