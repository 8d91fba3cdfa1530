"""Two revisions of the block-sparse attention kernels, timed side by side in one process.

A kernel change is kept when it measures faster; across processes the autotuners' picks and the GPU's state
differ, so both revisions run here, on the same inputs, each autotuned by its own autotuners: the installed
`longexposure.kernels.block_sparse_attention` ("new") and a copy of that module from another commit, loaded from a
file ("old"); further files (other commits, or variants written for the A/B) are further columns, each named by its
file's stem. `--graft NAME=FILE:PART[,PART]` adds a column NAME: the installed module with some kernels' code
taken from FILE (`GRAFTS`: the dK/dV or dQ kernel with its helpers), to find which kernel of a change gains or loses.
`--set NAME=VALUE` sets a module constant on an extra copy of the new module (e.g. `L2_SHARE=6`), a further column.
Forward, and backward with the default dQ mode, on the dense causal layout and on a random layout keeping about 20%
of the causal blocks (the diagonal always), at every head dim and length asked;
outputs compared against "old" (max abs difference), two interleaved CUDA-graph medians per revision, and dense causal
sdpa's beside the dense layout's (its backward: forward + backward minus forward, both graphs). Every
autotuner's picks are recorded (`picks`); `--forced` also times the installed forward held to each config of its
autotune space (`fwd_us_forced`), and the backward with its dQ or its dK/dV kernel so held (`bwd_us_forced_dq`,
`bwd_us_forced_dkdv`), on every layout: whether the autotuner, which times configs with L2 flushed (and keys on
shapes, not on density, so the first layout's picks serve all), picked the config that runs fastest in a warm CUDA
graph on each. Launch:

    git show fdc6bd5:kernels/block_sparse_attention.py > /tmp/bsa_old.py
    python benchmarks/attention_revision_ab.py --old /tmp/bsa_old.py --out ab.json
    # which backward kernel of the change costs at S 2048: the installed module with the old dQ, then the old dK/dV
    python benchmarks/attention_revision_ab.py --old /tmp/bsa_old.py --graft old_dq=/tmp/bsa_old.py:dq \
        old_dkdv=/tmp/bsa_old.py:dkdv --seq 2048 --out ab.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
from pathlib import Path
from types import ModuleType

import torch
import triton


def load_module(name: str, path: str) -> ModuleType:
    """A kernel module loaded from a file under its own name (its own Triton kernels and autotuners)."""
    if not Path(path).is_file():
        raise SystemExit(f"--old: no file at {path}")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the parts of kernels/block_sparse_attention.py a graft can swap: (first line, the line that starts the next part).
# A part's kernel must take the arguments the base module's launcher passes: since 5d7a7b7 the dQ kernel takes O
# and writes delta, so a dQ grafted from an earlier revision fails at its launch.
GRAFTS = {"dkdv": ("@triton.jit\ndef _dkdv_inner(", "@triton.jit\ndef _dq_inner("),
          "dq": ("@triton.jit\ndef _dq_inner(", "# " + "-" * 83 + " layout union")}


def graft(base: str, donor: str, parts: list[str]) -> str:
    """`base`'s source with each part's text replaced by `donor`'s (both files laid out in `GRAFTS`' order)."""
    for part in parts:
        if part not in GRAFTS:
            raise SystemExit(f"--graft: unknown part {part!r}; valid: {sorted(GRAFTS)}")
        start, end = GRAFTS[part]
        spans = []
        for text in (base, donor):
            i = text.find(start)
            j = text.find(end, i + 1) if i >= 0 else -1
            if j < 0:
                raise SystemExit(f"--graft: part {part!r} not found (from {start!r} to {end!r})")
            spans.append(text[i:j])
        base = base.replace(spans[0], spans[1])
    return base


def grafted(spec: str, workdir: Path) -> tuple[str, str]:
    """(column name, path of the written module) for `NAME=FILE:PART[,PART]`."""
    import longexposure.kernels.block_sparse_attention as new

    name, _, rest = spec.partition("=")
    path, _, parts = rest.rpartition(":")
    if not name or not path or not parts:
        raise SystemExit(f"--graft {spec!r}: give NAME=FILE:PART[,PART]")
    if not Path(path).is_file():
        raise SystemExit(f"--graft: no file at {path}")
    out = workdir / f"{name}.py"
    out.write_text(graft(Path(new.__file__).read_text(), Path(path).read_text(), parts.split(",")))
    return name, str(out)


def revisions(old: list[str], settings: list[str]) -> dict[str, ModuleType]:
    import longexposure.kernels.block_sparse_attention as new

    first, *others = old
    mods = {"old": load_module("bsa_old", first), "new": new}
    for path in others:
        name = Path(path).stem
        if name in mods:
            raise SystemExit(f"--old: two columns named {name!r}; give the files distinct names")
        mods[name] = load_module(f"bsa_{name}", path)
    if settings:
        extra = load_module("bsa_set", new.__file__)
        for setting in settings:
            name, _, value = setting.partition("=")
            if not hasattr(extra, name) or not value:
                raise SystemExit(f"--set {setting!r}: give NAME=VALUE for a constant the kernel module has")
            setattr(extra, name, type(getattr(extra, name))(value))
        mods[",".join(settings)] = extra
    return mods


def calls(m: ModuleType, q, k, v, do, lay, kw: dict) -> tuple:
    """One revision's forward and backward (the backward on that revision's own forward outputs) as closures."""
    def fwd():
        return m.block_sparse_attention_fwd(q, k, v, lay.kv_counts, lay.kv_indices, None, **kw)

    o, lse = fwd()

    def bwd():
        return m.block_sparse_attention_bwd(do, q, k, v, o, lse, lay.kv_counts, lay.kv_indices, lay.q_counts,
                                            lay.q_indices, None, **kw)

    return fwd, bwd


def sdpa_calls(q, k, v, do) -> tuple:
    """Dense causal sdpa's forward, and its forward + backward (autograd runs the backward on the forward's stream, so a
    graph holds both; the backward's time is the difference)."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def fwd():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def fwd_bwd():
        o = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
        return torch.autograd.grad(o, leaves, do)

    return fwd, fwd_bwd


TUNERS = ("_bsa_fwd_kernel", "_bsa_bwd_dq_kernel", "_bsa_bwd_dkdv_kernel")


def picks(m: ModuleType) -> dict[str, dict[str, str]]:
    """Each autotuner's chosen config per tuning key, as text."""
    return {name: {str(key): str(cfg) for key, cfg in getattr(m, name).cache.items()} for name in TUNERS}


def forced(tuner, fn, bench) -> dict[str, float]:
    """`fn` (a forward or a backward) with one kernel's autotuner held to each config of its space, us (CUDA-graph
    medians); the other kernels run their own picks."""
    from longexposure.measure import autotuner_held_to

    out = {}
    for cfg in list(tuner.configs):
        with autotuner_held_to(tuner, [cfg]):
            fn()
            out[str(cfg)] = round(bench(fn), 1)
    return out


def measure(mods: dict[str, ModuleType], d: int, seq: int, batch: int, heads: int, block: int,
            held: bool = False) -> list[dict]:
    from longexposure.attention.layout import BlockLayout

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v, do = (torch.randn(batch, heads, seq, d, device=dev, dtype=torch.float16, generator=gen) for _ in range(4))
    nq = seq // block
    tril = torch.ones(nq, nq, dtype=torch.bool).tril()
    keep = torch.rand(batch, heads, nq, nq, generator=torch.Generator().manual_seed(1)) < 0.2
    bench = lambda fn: triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3  # noqa: E731
    rows = []
    for sparsity, mask in (("0%", tril), ("~80%", (keep | torch.eye(nq, dtype=torch.bool)) & tril)):
        lay = BlockLayout.from_dense(mask.to(dev), block)
        kw = {"block": block, "causal": True, "scale": d**-0.5}
        fns = {name: calls(m, q, k, v, do, lay, kw) for name, m in mods.items()}
        ref = [t.float() for t in (*fns["old"][0](), *fns["old"][1]())]
        row = {"D": d, "S": seq, "sparsity": sparsity, "max_abs_diff_vs_old": {
            name: max(float((t.float() - r).abs().max()) for t, r in zip((*f(), *b()), ref, strict=True))
            for name, (f, b) in fns.items()}}
        sdpa = sdpa_calls(q, k, v, do) if sparsity == "0%" else None  # the dense baseline, in the same process
        for _ in range(2):  # interleaved, so drift hits every revision alike
            for name, (f, b) in fns.items():
                row.setdefault(f"fwd_us_{name}", []).append(round(bench(f), 1))
                row.setdefault(f"bwd_us_{name}", []).append(round(bench(b), 1))
            if sdpa is not None:
                sf, sfb = sdpa
                fwd_us = bench(sf)
                row.setdefault("fwd_us_sdpa", []).append(round(fwd_us, 1))
                row.setdefault("bwd_us_sdpa", []).append(round(bench(sfb) - fwd_us, 1))
        if held:  # every layout: the autotuners key on shapes, so the dense layout's picks serve the sparse ones too
            new, (f, b) = mods["new"], fns["new"]
            row["fwd_us_forced"] = forced(new._bsa_fwd_kernel, f, bench)
            row["bwd_us_forced_dq"] = forced(new._bsa_bwd_dq_kernel, b, bench)
            row["bwd_us_forced_dkdv"] = forced(new._bsa_bwd_dkdv_kernel, b, bench)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", required=True, nargs="+",
                    help="the kernel module's file at the other commit (git show REV:...), the outputs' reference; "
                         "more files: more columns, named by their stems")
    ap.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                    help="a third column: the new module with these constants")
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--graft", nargs="*", default=[], metavar="NAME=FILE:PART[,PART]",
                    help=f"more columns: the installed module with parts ({', '.join(GRAFTS)}) from FILE")
    ap.add_argument("--forced", action="store_true",
                    help="also the installed kernels, one at a time, held to each config of their autotune spaces")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_revision_ab needs a CUDA GPU")
    from longexposure.suite.provenance import provenance
    workdir = Path(tempfile.mkdtemp(prefix="bsa_graft_")) if args.graft else None
    grafts = [grafted(spec, workdir) for spec in args.graft]
    mods = revisions([*args.old, *(path for _, path in grafts)], args.set)
    res = {"meta": {**provenance(), "args": vars(args),
                    "inputs": "random fp16, causal; layouts: dense causal and random ~20%"}, "rows": []}
    for d in args.head_dims:
        for seq in args.seq:
            res["rows"] += measure(mods, d, seq, args.batch, args.heads, args.block, args.forced)
            res["picks"] = {name: picks(m) for name, m in mods.items()}
            Path(args.out).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
