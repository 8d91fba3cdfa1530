"""GPU benchmark of the peer systems: Sylva's embedded sparse layer, its preprocessing, and SP-LoRA (issue 7).

Goal: the issue-7 targets on one CUDA GPU (reported: H100), bf16. Launch:

    PYTHONUNBUFFERED=1 python benchmarks/bench_peers.py --out artifacts/peers/<device>.json
    python benchmarks/bench_peers.py --sections correctness,layer --out ...   # a subset

Order: (1) correctness on fresh random inputs, on the GPU: the block SDDMM (fp32 and bf16, odd token
counts, ragged edges, token splits) against an fp64 reference beside the same-precision torch error (2x
rule) with the output poisoned first; the fused scatter-add AdamW against the torch reference, and that
no frozen entry moved; SylvaLinear's dX and d(values) against dense masked autograd; SP-LoRA's
memory-optimised gradients against naive autograd. (2) timings, only if (1) passed: `layer` is the
`sylva-layer` task's setup (one dim x dim layer, batch 1) timed with the shared harness (CUDA events,
median), plus a breakdown of Sylva's backward pieces; `preprocess` and `splora` call the
`sylva-preprocess` / `splora-step` tasks (also reachable through the suites).

Targets (issue 7):
  T1 Sylva layer fwd+bwd >= 1.5x faster than LoRA at d=4096, s=2048 (paper: up to 2.3x).
  T2 hierarchical preprocessing peak memory >= 2.3x below exact K-FAC at LLaMA-3B shapes.
  T3 SP-LoRA within 10% of LoRA in time and memory; SPP(NO) >= 2x LoRA memory or OOM.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch

from longexposure.suite.provenance import provenance


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def _random_blocks(shape, block, density, gen, device):
    nbr, nbc = -(-shape[0] // block), -(-shape[1] // block)
    mask = torch.rand(nbr, nbc, generator=gen) < density
    mask[0, 0] = True
    rows, cols = mask.nonzero(as_tuple=True)
    return mask.to(device), rows.to(torch.int32).to(device), cols.to(torch.int32).to(device)


# ----------------------------------------------------------------------------------------- correctness


def correctness(device: torch.device) -> list[dict]:
    from longexposure.kernels import block_sddmm as k

    from longexposure.methods.sp_lora import SparseLoRALinear
    from longexposure.methods.sylva_layer import SylvaLinear
    from longexposure.ops.block_sddmm import (
        block_adamw_reference,
        block_mask_to_dense,
        block_sddmm_reference,
        dense_to_blocks,
    )

    rows_out: list[dict] = []
    gen = torch.Generator().manual_seed(int(time.time()))  # fresh inputs every run

    # SDDMM: (tokens, out, in, block, density, split, dtype)
    for T, n_out, n_in, b, dens, split, dt in [
        (2048, 4096, 4096, 64, 0.05, None, torch.bfloat16),
        (2048, 4096, 4096, 64, 0.05, None, torch.float32),
        (1025, 1000, 3000, 128, 0.1, 3, torch.bfloat16),
        (97, 257, 130, 16, 0.5, 1, torch.float16),
        (4096, 2048, 8192, 32, 0.02, None, torch.bfloat16),
    ]:
        _, r, c = _random_blocks((n_out, n_in), b, dens, gen, device)
        dy = torch.randn(T, n_out, generator=gen).to(device, dt)
        x = torch.randn(T, n_in, generator=gen).to(device, dt)
        hi = block_sddmm_reference(dy.double(), x.double(), r, c, b)
        same = block_sddmm_reference(dy, x, r, c, b)
        out = k.block_sddmm(dy, x, r, c, b, split=split)
        err, ref_err = _rel(out, hi), _rel(same, hi)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dt]
        ok = bool(torch.isfinite(out).all()) and err <= max(2 * ref_err, tol)
        rows_out.append(
            {
                "check": "block_sddmm",
                "shape": f"T{T} {n_out}x{n_in} b{b} d{dens} split{split}",
                "dtype": str(dt),
                "rel_err": err,
                "torch_same_precision_rel_err": ref_err,
                "ok": ok,
            }
        )

    # Fused update: 3 layers, bf16 dense weights, fp32 compact master values.
    shapes = [(4096, 4096), (11008, 4096), (1000, 3000)]
    b = 64
    layers = []
    for s in shapes:
        _, r, c = _random_blocks(s, b, 0.05, gen, device)
        w = torch.randn(s, generator=gen).to(device, torch.bfloat16)
        v = dense_to_blocks(w.float(), r, c, b)
        edge = dense_to_blocks(torch.ones(s, dtype=torch.bool, device=device), r, c, b)
        g = torch.randn(v.shape, generator=gen).to(device) * edge
        layers.append((w, v, g, r, c))
    plan = k.make_block_update_plan(shapes, [lay[3] for lay in layers], [lay[4] for lay in layers], b)
    m1 = torch.zeros(plan.nnz, b, b, device=device)
    m2 = torch.zeros_like(m1)
    refs = [(w.clone(), v.clone(), torch.zeros_like(v), torch.zeros_like(v)) for w, v, *_ in layers]
    w0 = [lay[0].clone() for lay in layers]
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    for step in (1, 2):
        k.block_update_(
            plan,
            [lay[0] for lay in layers],
            [lay[1] for lay in layers],
            [lay[2] for lay in layers],
            m1,
            m2,
            step=step,
            **hp,
        )
        for (wr, vr, r1, r2), lay in zip(refs, layers, strict=True):
            block_adamw_reference(wr, vr, lay[2], r1, r2, lay[3], lay[4], b, step=step, **hp)
    for (w, v, _, r, c), (wr, vr, _, _), orig in zip(layers, refs, w0, strict=True):
        mask = torch.zeros(-(-w.shape[0] // b), -(-w.shape[1] // b), dtype=torch.bool, device=device)
        mask[r.long(), c.long()] = True
        frozen = ~block_mask_to_dense(mask, tuple(w.shape), b)
        ulps = ((w.float() - wr.float()).abs() > 1e-2 * wr.float().abs() + 1e-3).sum().item()
        ok = torch.equal(w[frozen], orig[frozen]) and _rel(v, vr) < 1e-5 and ulps == 0
        rows_out.append(
            {
                "check": "fused_adamw_scatter",
                "shape": str(tuple(w.shape)),
                "rel_err_values": _rel(v, vr),
                "frozen_unchanged": bool(torch.equal(w[frozen], orig[frozen])),
                "ok": bool(ok),
            }
        )

    # SylvaLinear fwd + bwd against dense autograd on the masked weight.
    for dt in (torch.bfloat16, torch.float32):
        n = 1536
        mask, r, c = _random_blocks((n, n), 64, 0.05, gen, device)
        w = torch.randn(n, n, generator=gen).to(device, dt) / n**0.5
        layer = SylvaLinear(w, None, mask, 64, backend="triton")
        x = torch.randn(2, 999, n, generator=gen).to(device, dt).requires_grad_()
        dy = torch.randn(2, 999, n, generator=gen).to(device, dt)
        layer(x).backward(dy)
        wd = w.double().requires_grad_()
        xd = x.detach().double().requires_grad_()
        (xd @ wd.t()).backward(dy.double())
        elem = block_mask_to_dense(mask, (n, n), 64)
        dv_ref = dense_to_blocks(wd.grad * elem, layer.block_rows, layer.block_cols, 64)
        e_dx, e_dv = _rel(x.grad, xd.grad), _rel(layer.values.grad, dv_ref)
        tol = 1e-2 if dt == torch.bfloat16 else 1e-4
        rows_out.append(
            {
                "check": "sylva_linear_grads",
                "dtype": str(dt),
                "rel_err_dx": e_dx,
                "rel_err_dvalues": e_dv,
                "ok": e_dx < tol and e_dv < tol,
            }
        )

    # SP-LoRA memory-optimised gradients vs naive autograd (same dtype) and vs fp64.
    for dt in (torch.bfloat16, torch.float32):
        n_out, n_in = 2048, 4096
        w = torch.randn(n_out, n_in, generator=gen)
        w = (w * (torch.rand(n_out, n_in, generator=gen) > 0.5)).to(device, dt)
        x = torch.randn(1, 777, n_in, generator=gen).to(device, dt)
        dy = torch.randn(1, 777, n_out, generator=gen).to(device, dt)
        up = torch.randn(n_out, 16, generator=gen).to(device) * 0.01
        down = torch.randn(16, n_in, generator=gen).to(device) * 0.01
        res = {}
        runs = (("sp-lora", dt, "triton"), ("sp-lora", dt, "torch"), ("sp-lora-no", dt, "auto"),
                ("sp-lora-no", torch.float64, "auto"))  # fmt: skip
        for v, wdt, backend in runs:  # each layer gets its own copy: sp-lora merges into its weight in place
            lay = SparseLoRALinear(w.to(wdt).clone(), None, v, 16, backend=backend)
            lay.lora_up.data, lay.lora_down.data = up.to(wdt).clone(), down.to(wdt).clone()
            xx = x.to(wdt).clone().requires_grad_()
            lay(xx).backward(dy.to(wdt))
            res[(v, wdt, backend)] = (xx.grad, lay.lora_up.grad, lay.lora_down.grad, lay.weight.detach().clone())
        hi = res[("sp-lora-no", torch.float64, "auto")]
        ref_errs = [_rel(a, h) for a, h in zip(res[("sp-lora-no", dt, "auto")][:3], hi[:3], strict=True)]
        # A kept entry can round to exactly 0 and then drop out of the mask (the mask is read from the
        # weight): when w + s up down cancels (merge), or when |w| is below the rounding of w + d (restore
        # computes (w + d) - d). A property of the paper's algorithm, not of a kernel: such entries are
        # counted and must be explained by one of the two; a pruned entry that became non-zero always fails.
        delta = lay.scaling * (up.double() @ down.double())
        cancel = 2.0**-6 if dt == torch.bfloat16 else 2.0**-18
        w64 = w.double()
        explained = ((w64 + delta).abs() <= cancel * w64.abs()) | (w64.abs() <= cancel * delta.abs())
        for backend in ("triton", "torch"):
            got = res[("sp-lora", dt, backend)]
            errs = [_rel(a, h) for a, h in zip(got[:3], hi[:3], strict=True)]
            gained = int(((got[3] != 0) & (w == 0)).sum())
            lost = (got[3] == 0) & (w != 0)
            unexplained = int((lost & ~explained).sum())
            zeros_kept = gained == 0 and not bool(lost.any())
            restore_err = _rel(got[3], w)
            tol = 1e-2 if dt == torch.bfloat16 else 1e-5
            ok = gained == 0 and unexplained == 0 and all(
                e <= max(2 * re, tol) for e, re in zip(errs, ref_errs, strict=True)
            )
            rows_out.append(
                {
                    "check": "sp_lora_grads_vs_naive",
                    "backend": backend,
                    "dtype": str(dt),
                    "rel_err_dx_dup_ddown": errs,
                    "naive_same_precision_rel_err": ref_errs,
                    "restored_weight_rel_err": restore_err,
                    "zeros_kept": zeros_kept,
                    "pruned_became_nonzero": gained,
                    "kept_became_zero": int(lost.sum()),
                    "kept_became_zero_unexplained": unexplained,
                    "ok": bool(ok and restore_err < tol),
                }
            )
    return rows_out


# ----------------------------------------------------------------------------------------- timings


def _sylva_breakdown(device: torch.device, dim: int, seq: int, sparsity: float, block: int) -> dict:
    """Sylva's pieces on one layer: forward GEMM, dX GEMM, the dense dW GEMM it avoids, SDDMM, fused update."""
    from longexposure.kernels.block_sddmm import block_sddmm, block_update_

    from longexposure.measure import time_fn
    from longexposure.tasks.peer_systems import SylvaLayerCase, build_layer

    layer, opt, _ = build_layer(
        SylvaLayerCase(method="sylva", dim=dim, seq_len=seq, sparsity=sparsity, block=block), device
    )
    x = torch.randn(seq, dim, device=device, dtype=torch.bfloat16)
    dy = torch.randn(seq, dim, device=device, dtype=torch.bfloat16)
    w, rows, cols = layer.weight, layer.block_rows, layer.block_cols
    grad = torch.randn_like(layer.values)
    plan, (m1, m2) = opt._groups[0][1], opt._groups[0][2]
    return {
        "fwd_gemm_ms": time_fn(lambda: x @ w.t(), device, 5, 30).p50,
        "dx_gemm_ms": time_fn(lambda: dy @ w, device, 5, 30).p50,
        "dw_dense_gemm_ms": time_fn(lambda: dy.t() @ x, device, 5, 30).p50,
        "sddmm_ms": time_fn(lambda: block_sddmm(dy, x, rows, cols, block), device, 5, 30).p50,
        "fused_update_ms": time_fn(
            lambda: block_update_(plan, [w], [layer.values], [grad], m1, m2, lr=1e-6), device, 5, 30
        ).p50,
        "trainable_blocks": layer.nnz_blocks,
    }


def _splora_shape(device: torch.device, n_out: int, n_in: int, seq: int, rank: int, gen: torch.Generator) -> dict:
    from longexposure.kernels.masked_low_rank import masked_adapter_grads_restore_, masked_low_rank_add_

    from longexposure.measure import time_fn
    from longexposure.ops.masked_low_rank import (
        masked_adapter_grads_restore_reference_,
        masked_low_rank_add_reference_,
    )

    w = torch.randn(n_out, n_in, generator=gen)
    w = (w * (torch.rand(n_out, n_in, generator=gen) > 0.5)).to(device, torch.bfloat16)
    x = torch.randn(seq, n_in, device=device, dtype=torch.bfloat16)
    dy = torch.randn(seq, n_out, device=device, dtype=torch.bfloat16)
    up = torch.randn(n_out, rank, device=device) * 0.01
    down = torch.randn(rank, n_in, device=device) * 0.01
    g = dy.t() @ x

    def torch_pair():  # forward merge + backward mask / adapter gradients / restore, as torch ops
        masked_low_rank_add_reference_(w, up, down, 2.0)
        masked_adapter_grads_restore_reference_(g, w, up, down, 2.0)

    def fused_pair():
        masked_low_rank_add_(w, up, down, 2.0)
        masked_adapter_grads_restore_(g, w, up, down, 2.0)

    def ms(fn) -> float:
        return time_fn(fn, device, 5, 30).p50

    return {
        "shape": [n_out, n_in],
        "tokens": seq,
        "fwd_gemm_ms": ms(lambda: x @ w.t()),
        "dx_gemm_ms": ms(lambda: dy @ w),
        "dw_dense_gemm_ms": ms(lambda: dy.t() @ x),
        "merge_torch_ms": ms(lambda: masked_low_rank_add_reference_(w, up, down, 0.0)),
        "merge_fused_ms": ms(lambda: masked_low_rank_add_(w, up, down, 0.0)),
        "merge_and_grads_restore_torch_ms": ms(torch_pair),
        "merge_and_grads_restore_fused_ms": ms(fused_pair),
    }


def splora_breakdown(device: torch.device, seq: int = 2048, rank: int = 16) -> list[dict]:
    """SP-LoRA's per-layer pieces at LLaMA-7B shapes, bf16: the GEMMs LoRA also runs, the dense weight
    gradient SP-LoRA adds, and its weight-sized passes as torch ops (Alg. 1-2) against the fused kernels."""
    rows = []
    gen = torch.Generator().manual_seed(0)
    for n_out, n_in in ((4096, 4096), (11008, 4096), (4096, 11008)):
        rows.append(_splora_shape(device, n_out, n_in, seq, rank, gen))
        print(rows[-1], flush=True)
    return rows


def layer_timings(device: torch.device, dims, seqs, sparsity: float, block: int) -> list[dict]:
    from longexposure.suite.context import RunContext
    from longexposure.tasks.peer_systems import SylvaLayerCase, sylva_layer

    ctx = RunContext(device=device, preset="bench", out_dir=Path("."))
    rows = []
    for dim in dims:
        for seq in seqs:
            for method in ("full", "lora", "sylva"):
                case = SylvaLayerCase(
                    method=method, dim=dim, seq_len=seq, sparsity=sparsity, block=block, warmup=5, reps=30
                )
                res = sylva_layer(case, ctx)
                rows.append(
                    {
                        "dim": dim,
                        "seq_len": seq,
                        "method": method,
                        "fwd_bwd_ms": res["fwd_bwd_ms"]["p50"],
                        "opt_ms": res["opt_ms"]["p50"],
                        "peak_mem_gib": res.get("peak_mem_gib"),
                        "info": res["info"],
                    }
                )
            parts = _sylva_breakdown(device, dim, seq, sparsity, block)
            rows.append({"dim": dim, "seq_len": seq, "method": "sylva-breakdown", **parts})
    return rows


def task_rows(task: str, cases: list[dict], device: torch.device) -> list[dict]:
    from longexposure.measure import is_oom
    from longexposure.registry import TASKS
    from longexposure.suite.context import RunContext

    entry = TASKS.entry(task)
    ctx = RunContext(device=device, preset="bench", out_dir=Path("."))
    rows = []
    for case in cases:
        try:
            res = entry.obj(entry.meta["case"](**case), ctx)
            row = {
                **case,
                "status": "ok",
                **{k: (v["p50"] if isinstance(v, dict) and "p50" in v else v) for k, v in res.items() if k != "info"},
            }
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            row = {**case, "status": "OOM"}
        finally:
            torch.cuda.empty_cache()
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file for all rows")
    p.add_argument("--sections", default="correctness,layer,preprocess,splora-breakdown,splora")
    p.add_argument("--dims", default="4096", help="layer dims for the layer section")
    p.add_argument("--seqs", default="2048")
    p.add_argument("--sparsity", type=float, default=0.95)
    p.add_argument("--block", type=int, default=64)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_peers.py needs a CUDA GPU")
    device = torch.device("cuda")
    sections = args.sections.split(",")
    result = {**provenance(device), "sections": sections}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2, default=str) + "\n")

    ok = True
    if "correctness" in sections:
        result["correctness"] = correctness(device)
        ok = all(r["ok"] for r in result["correctness"])
        for r in result["correctness"]:
            print(("PASS " if r["ok"] else "FAIL ") + json.dumps(r, default=str), flush=True)
        save()
        if not ok:
            print("correctness failed: no timings", flush=True)
            return 1
    if "layer" in sections:
        try:
            result["layer"] = layer_timings(
                device,
                [int(d) for d in args.dims.split(",")],
                [int(s) for s in args.seqs.split(",")],
                args.sparsity,
                args.block,
            )
        except Exception:  # noqa: BLE001
            result["layer_error"] = traceback.format_exc()
            print(result["layer_error"], flush=True)
        save()
    if "preprocess" in sections:
        cases = [dict(model="llama-3b", factor=f, batches=4, batch=4, seq_len=256) for f in ("hierarchical", "exact")]
        result["preprocess"] = task_rows("sylva-preprocess", cases, device)
        save()
    if "splora-breakdown" in sections:
        result["splora_breakdown"] = splora_breakdown(device)
        save()
    if "splora" in sections:
        cases = [
            dict(model="llama-7b", method=m)
            for m in ("lora", "lora-wgrad", "sp-lora", "sp-lora-gc", "sp-lora-no", "spp-gc", "spp-no")
        ]
        cases.insert(3, dict(model="llama-7b", method="sp-lora", backend="torch"))
        result["splora"] = task_rows("splora-step", cases, device)
        save()

    # Summary table and targets.
    print("\n| section | case | numbers |\n|---|---|---|")
    for r in result.get("layer", []):
        nums = {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in r.items()
            if k not in ("dim", "seq_len", "method", "info")
        }
        print(f"| layer | d={r['dim']} s={r['seq_len']} {r['method']} | {nums} |")
    targets = {}
    lay = {(r["dim"], r["seq_len"], r["method"]): r for r in result.get("layer", [])}
    for (d, s, m), r in lay.items():
        if m == "sylva" and (d, s, "lora") in lay:
            lo, fu = lay[(d, s, "lora")], lay[(d, s, "full")]
            targets[f"T1 lora/sylva fwd+bwd d={d} s={s}"] = lo["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            targets[f"   full/sylva fwd+bwd d={d} s={s}"] = fu["fwd_bwd_ms"] / r["fwd_bwd_ms"]
            targets[f"   lora/sylva fwd+bwd+opt d={d} s={s}"] = (lo["fwd_bwd_ms"] + lo["opt_ms"]) / (
                r["fwd_bwd_ms"] + r["opt_ms"]
            )
    pre = {r["factor"]: r for r in result.get("preprocess", [])}
    if pre.get("exact", {}).get("status") == "ok" and pre.get("hierarchical", {}).get("status") == "ok":
        targets["T2 exact/hierarchical preprocessing peak"] = (
            pre["exact"]["peak_mem_gib"] / pre["hierarchical"]["peak_mem_gib"]
        )
    sp = {r["method"]: r for r in result.get("splora", []) if r.get("backend", "auto") == "auto"}
    if sp.get("lora", {}).get("status") == "ok" and sp.get("sp-lora", {}).get("status") == "ok":
        targets["T3 sp-lora/lora time"] = sp["sp-lora"]["total_ms"] / sp["lora"]["total_ms"]
        targets["T3 sp-lora/lora memory"] = sp["sp-lora"]["peak_mem_gib"] / sp["lora"]["peak_mem_gib"]
        if sp.get("lora-wgrad", {}).get("status") == "ok":  # the floor: LoRA + the dense weight gradients
            targets["   lora-wgrad/lora time (SP-LoRA's floor)"] = sp["lora-wgrad"]["total_ms"] / sp["lora"]["total_ms"]
        no = sp.get("spp-no", {})
        targets["T3 spp-no/lora memory"] = (
            "OOM" if no.get("status") == "OOM" else (no["peak_mem_gib"] / sp["lora"]["peak_mem_gib"] if no else None)
        )
    result["targets"] = targets
    save()
    for name, v in targets.items():
        print(f"{name}: {v if isinstance(v, str) else round(v, 3)}")
    print(f"device: {result['device']}; wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
