"""Two revisions of the neuron-block MLP kernels, timed side by side in one process.

As `attention_revision_ab.py` does for attention: the installed `longexposure.kernels.neuron_block_mlp` ("new") and
a copy of that module from another commit, loaded from a file ("old"), each autotuned by its own autotuners, on the
same inputs. Per count of active blocks (capacity: every block, the count on the device, tuned at the first count as
`bench_mlp_operator.py --quick` tunes at density 1.0): fc1 (sdd with bias, ReLU and the ReLU bits), fc2 (dsd with
bias), dZ (sdd reading the bits) and the frozen MLP's backward as the op runs it (dZ, then dx in dsd), CUDA-graph
medians in us, two interleaved rounds; every output compared against "old" (max abs difference; the bits must match
exactly). Each revision's autotuners pick for themselves (`picks`): a change that alters a kernel's registers or
shared memory may move its pick, and the times then include that. Launch:

    git show ce49651:kernels/neuron_block_mlp.py > /tmp/nbm_old.py
    python benchmarks/mlp_revision_ab.py --old /tmp/nbm_old.py --out ab.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import ModuleType

import torch
import triton
import triton.testing
from attention_revision_ab import load_module


def calls(m: ModuleType, x, w1, b1, w2t, b2, dy, count: int, capacity: int, block: int) -> dict:
    """One revision's fc1, fc2, dZ and frozen backward at `count` active blocks (the first ones) as closures."""
    dev, t = x.device, x.shape[0]
    ids = torch.arange(capacity, device=dev, dtype=torch.int32)
    cnt = torch.tensor([count], device=dev, dtype=torch.int32)
    h = x.new_empty(t, capacity * block)
    bits = m.relu_bits(t, capacity * block, dev)
    dz = x.new_empty(t, capacity * block)
    dx, y = torch.empty_like(x), torch.empty_like(x)

    def fc1():
        return m._launch_sdd(x, w1, ids, cnt, block, bias=b1, mask=bits, epilogue=1, out=h)

    def fc2():
        return m._launch_dsd(h, w2t, ids, cnt, block, bias=b2, out=y)

    def dzs():
        return m._launch_sdd(dy, w2t, ids, cnt, block, mask=bits, epilogue=2, out=dz)

    def frozen_bwd():
        dzs()
        return m._launch_dsd(dz, w1, ids, cnt, block, out=dx)

    fc1()
    fc2()
    frozen_bwd()
    n = count * block
    outputs = {"h": h[:, :n].float(), "bits": bits[:, : n // 8].clone(), "y": y.float(), "dz": dz[:, :n].float(),
               "dx": dx.float()}
    return {"fns": {"fc1": fc1, "fc2": fc2, "dz": dzs, "frozen_bwd": frozen_bwd}, "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, help="the kernel module's file at the other commit (git show REV:...)")
    ap.add_argument("--counts", type=int, nargs="+", default=[128, 64, 13],
                    help="active blocks of 64 (of 128), in order: the first one tunes")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("mlp_revision_ab needs a CUDA GPU")
    import longexposure.kernels.neuron_block_mlp as new

    from longexposure.suite.provenance import provenance

    mods = {"old": load_module("nbm_old", args.old), "new": new}
    d, ffn, block = 2048, 8192, 64
    capacity = ffn // block
    if not all(0 < c <= capacity for c in args.counts):
        raise SystemExit(f"--counts: each must be 1..{capacity} (blocks of {block} in ffn {ffn}), got {args.counts}")
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    x, dy = (torch.randn(args.tokens, d, device=dev, dtype=torch.float16, generator=gen) for _ in range(2))
    w1 = torch.randn(ffn, d, device=dev, dtype=torch.float16, generator=gen) * d**-0.5
    b1 = torch.randn(ffn, device=dev, dtype=torch.float16, generator=gen) * 0.1
    w2t = torch.randn(ffn, d, device=dev, dtype=torch.float16, generator=gen) * ffn**-0.5  # fc2.weight^T, neuron-major
    b2 = torch.randn(d, device=dev, dtype=torch.float16, generator=gen) * 0.1
    bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3  # noqa: E731
    res = {"meta": {**provenance(), "args": vars(args), "shapes": f"tokens {args.tokens}, d {d}, ffn {ffn}, "
                    f"block {block}, capacity {capacity} blocks, the first `count` active, fp16 random weights"},
           "rows": []}
    for count in args.counts:
        per = {name: calls(m, x, w1, b1, w2t, b2, dy, count, capacity, block) for name, m in mods.items()}
        ref = per["old"]["outputs"]
        row = {"count": count, "density": round(count / capacity, 3), "max_abs_diff_vs_old": {
            name: {k: float((v.float() - ref[k].float()).abs().max()) for k, v in p["outputs"].items()}
            for name, p in per.items()}}
        for _ in range(2):  # interleaved, so drift hits both revisions alike
            for name, p in per.items():
                for what, fn in p["fns"].items():
                    row.setdefault(f"{what}_us_{name}", []).append(round(bench(fn), 2))
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
        res["picks"] = {name: {tuner: {str(k): str(v) for k, v in getattr(m, tuner).cache.items()}
                               for tuner in ("_sdd_kernel", "_dsd_kernel")} for name, m in mods.items()}
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
