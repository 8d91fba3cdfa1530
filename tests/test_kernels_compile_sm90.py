"""Every Triton kernel variant compiles for Hopper (sm_90) to PTX and SASS, offline, on a machine without a GPU.

The interpreter that runs the kernels in the other tests executes them as Python: it checks their numbers, not
that Triton's compiler accepts them (types across constexpr branches, tensor descriptors handed between jit
functions, atomics). The opt-in paths (LONGEXPOSURE_BSA_DQ=atomic, LONGEXPOSURE_BSA_TMA=1, LONGEXPOSURE_TMA=1)
would otherwise meet the compiler first on a lent GPU. This compiles each variant with Triton's own ptxas for
sm_90, in a child process without TRITON_INTERPRET (which decides how the kernels are built at import), and checks
the PTX holds what the variant is for: bulk tensor copies (TMA) exactly where descriptors are asked for, fp32
reductions to global memory where dQ is added by atomics, and bulk tensor reduce-adds where it is added a tile at a
time (LONGEXPOSURE_BSA_DQ=bulk, which the interpreter cannot run).

Arguments are specialised as Triton's JIT specialises a real launch: unit strides become the constant 1, pointers
and the other integers are known multiples of 16 (true of the shapes that matter: d 2048, ffn 8192, 2048 tokens).
With that, the MLP kernels' main loops must be fully multi-buffered: num_stages copies of both operand tiles in
shared memory, filled by asynchronous copies. Two ways they were not, both found by this compile: the
weight-gradient kernel's pointer path clamped its column indices (min(offs_c, n_cols - 1)), which hid their
contiguity, so its compact operand went through registers (80 KB instead of 128 KB; it ran at 2.7x cuBLAS's time on
the H100, run 6); and dsd loaded each step's block id in that step, so its weight load depended on a load of its
own iteration and both operands were only double-buffered (64 KB).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from longexposure.kernels.neuron_block_mlp import FALLBACK_TILE

ATTENTION = {"D": 64, "BLOCK": 64, "BLOCK_D": 64, "CAUSAL": True, "HAS_LENS": True, "EVEN_S": False,
             "DOT_PREC": "tf32", "SPLIT": 1}
MLP = {"BLOCK": 64, "HAS_LOW_RANK": True, "HAS_BIAS": True, "UPCAST": False, "PRECISION": "tf32", "BM": 128,
       "BN": 128, "BK": 64, "GROUP_M": 8}
WGRAD = {"EPILOGUE": 3, "ZERO_REST": True, "NARROW": True}  # both branches of the weight gradient's tile choice
# strides that are 1 in every launch (row-major operands, neuron-major weights); the JIT makes them constants
UNIT_STRIDES = {"stride_ak", "stride_wk", "stride_er", "stride_lr", "stride_cc", "stride_sr",
                "stride_on", "stride_dn", "stride_gk", "stride_bias"}
# module, kernel, constexprs (beyond the shared ones above), num_warps, num_stages
CASES = {
    f"attention {name} tma={tma}": ("block_sparse_attention", kernel, {**ATTENTION, **extra, "USE_TMA": tma}, 4, 3)
    for tma in (False, True)
    for name, kernel, extra in (
        ("fwd", "_bsa_fwd_kernel", {"NKP": 16, "PAIR": 1, "EVEN_TILE": False}),
        # LONGEXPOSURE_BSA_PAIR=1: two query blocks per program (128-row tiles at block 64)
        ("fwd pair", "_bsa_fwd_kernel", {"NKP": 16, "PAIR": 2, "EVEN_TILE": False}),
        ("dq", "_bsa_bwd_dq_kernel", {"NKP": 16, "PAIR": 1, "EVEN_TILE": False}),
        ("dq pair", "_bsa_bwd_dq_kernel", {"NKP": 16, "PAIR": 2, "EVEN_TILE": False}),
        ("dkdv", "_bsa_bwd_dkdv_kernel", {"NQP": 16, "DQ_ATOMIC": 0, "PAIR": 1, "EVEN_TILE": False}),
        ("dkdv dq-atomic", "_bsa_bwd_dkdv_kernel", {"NQP": 16, "DQ_ATOMIC": 1, "PAIR": 1, "EVEN_TILE": False}),
        ("dkdv pair", "_bsa_bwd_dkdv_kernel", {"NQP": 16, "DQ_ATOMIC": 0, "PAIR": 2, "EVEN_TILE": False}),
        ("dkdv dq-atomic pair", "_bsa_bwd_dkdv_kernel", {"NQP": 16, "DQ_ATOMIC": 1, "PAIR": 2, "EVEN_TILE": False}),
        # LONGEXPOSURE_BSA_DQ=bulk: dQ added a tile at a time by a tensor reduce-add (never run by the interpreter)
        ("dkdv dq-bulk", "_bsa_bwd_dkdv_kernel", {"NQP": 16, "DQ_ATOMIC": 2, "PAIR": 1, "EVEN_TILE": False}),
        ("dkdv dq-bulk pair", "_bsa_bwd_dkdv_kernel", {"NQP": 16, "DQ_ATOMIC": 2, "PAIR": 2, "EVEN_TILE": False}),
    )
}
for _name, _kernel, _extra in (("fwd", "_bsa_fwd_kernel", {"NKP": 16, "PAIR": 1, "EVEN_TILE": False}),
                               ("dq", "_bsa_bwd_dq_kernel", {"NKP": 16, "PAIR": 1, "EVEN_TILE": False}),
                               ("dkdv dq-atomic", "_bsa_bwd_dkdv_kernel",
                                {"NQP": 16, "DQ_ATOMIC": 1, "PAIR": 1, "EVEN_TILE": False}),
                               ("dkdv dq-bulk", "_bsa_bwd_dkdv_kernel",
                                {"NQP": 16, "DQ_ATOMIC": 2, "PAIR": 1, "EVEN_TILE": False})):
    # half-height tiles at block 64 (64 x 32), autotune candidates since 2026-12-05, with 8 warps
    CASES[f"attention {_name} split=2 tma=True"] = (
        "block_sparse_attention", _kernel, {**ATTENTION, **_extra, "SPLIT": 2, "USE_TMA": True}, 8, 2)
CASES["attention delta zeroing dq"] = (
    "block_sparse_attention", "_bsa_bwd_delta_kernel",
    {"D": 64, "BLOCK": 64, "BLOCK_D": 64, "EVEN_S": False}, 4, 1,
)
for _tma in (False, True):  # sdd with 128-wide column tiles over 64-neuron blocks: the multi-block box path
    for _persistent in (False, True):  # LONGEXPOSURE_PERSISTENT=1: one program per SM walks the tiles
        _name = f"tma={_tma}" + " persistent" * _persistent
        CASES[f"mlp sdd {_name}"] = ("neuron_block_mlp", "_sdd_kernel", {
            **MLP, "EPILOGUE": 1, "MASK_OUT": True, "HAS_SKINNY": True, "HAS_COLSUM": False, "BR": 16, "BR2": 16,
            "USE_TMA": _tma, "BITS_TMA": _tma, "EVEN_K": True, "PERSISTENT": _persistent, "NARROW": True}, 8, 4)
        CASES[f"mlp dsd {_name}"] = (
            "neuron_block_mlp", "_dsd_kernel", {**MLP, "EPILOGUE": 0, "USE_TMA": _tma, "PERSISTENT": _persistent}, 8, 4)
    CASES[f"mlp wgrad tma={_tma}"] = ("neuron_block_mlp", "_wgrad_kernel",
                                      {**MLP, **WGRAD, "USE_TMA": _tma, "EVEN_T": True}, 8, 4)

# the 256-wide tiles sdd and wgrad tune over since they key on the capacity: fc1 forward (ReLU, bits out), dZ (bits
# in, fc1's bias gradient summed in the epilogue)
for _epilogue in (1, 2):
    CASES[f"mlp sdd 128x256 epilogue={_epilogue}"] = ("neuron_block_mlp", "_sdd_kernel", {
        **MLP, "BN": 256, "EPILOGUE": _epilogue, "MASK_OUT": _epilogue == 1, "HAS_SKINNY": True,
        "HAS_COLSUM": _epilogue == 2, "BR": 16, "BR2": 16, "USE_TMA": False, "BITS_TMA": False, "EVEN_K": True,
        "PERSISTENT": False, "NARROW": True}, 8, 3)
# Hopper's default path (descriptors, persistent) at the widest tile it tunes over, with both branches of `_narrow`:
# the half-width branch's buffers share the full-width one's shared memory (222,208 bytes with it or without it)
CASES["mlp sdd 128x256 tma persistent"] = ("neuron_block_mlp", "_sdd_kernel", {
    **MLP, "BN": 256, "EPILOGUE": 1, "MASK_OUT": True, "HAS_SKINNY": True, "HAS_COLSUM": False, "BR": 16, "BR2": 16,
    "USE_TMA": True, "BITS_TMA": True, "EVEN_K": True, "PERSISTENT": True, "NARROW": True}, 8, 3)
# LoRA's weight gradients (rank-wide outputs) over `_skinny_configs`' 16-wide tiles
CASES["mlp wgrad skinny 64x16"] = ("neuron_block_mlp", "_wgrad_skinny_kernel", {
    **MLP, "BM": 64, "BN": 16, **WGRAD, "USE_TMA": False, "EVEN_T": True}, 4, 4)
CASES["mlp wgrad 128x256"] = ("neuron_block_mlp", "_wgrad_kernel",
                              {**MLP, "BN": 256, **WGRAD, "USE_TMA": False, "EVEN_T": True}, 8, 3)

# LONGEXPOSURE_AUTOTUNE=0's one tile, which no autotuner can skip when it does not fit: every MLP kernel in fp16 and
# fp32 with descriptors and the persistent schedule (the largest shared-memory footprint) fits sm_90's 227 KB
_bm, _bn, _bk, _warps, _stages = FALLBACK_TILE
for _dtype in ("fp16", "fp32"):
    _tile = {**MLP, "BM": _bm, "BN": _bn, "BK": _bk, "PRECISION": "ieee" if _dtype == "fp32" else "tf32"}
    CASES[f"mlp sdd fallback {_dtype}"] = ("neuron_block_mlp", "_sdd_kernel", {
        **_tile, "EPILOGUE": 1, "MASK_OUT": True, "HAS_SKINNY": True, "HAS_COLSUM": False, "BR": 16, "BR2": 16,
        "USE_TMA": True, "BITS_TMA": True, "EVEN_K": False, "PERSISTENT": True, "NARROW": True},
        _warps, _stages, _dtype)
    CASES[f"mlp dsd fallback {_dtype}"] = ("neuron_block_mlp", "_dsd_kernel", {
        **_tile, "EPILOGUE": 0, "USE_TMA": True, "PERSISTENT": True}, _warps, _stages, _dtype)
    CASES[f"mlp wgrad fallback {_dtype}"] = ("neuron_block_mlp", "_wgrad_kernel", {
        **_tile, **WGRAD, "USE_TMA": True, "EVEN_T": False}, _warps, _stages, _dtype)
SHARED_LIMIT_SM90 = 232448  # bytes of shared memory one block may have on an H100 / H200

POINTERS = {"m_ptr": "*u8", "cs_ptr": "*fp32", "lse_ptr": "*fp32", "delta_ptr": "*fp32", "dq_acc_ptr": "*fp32",
            "o2_ptr": "*fp32"}


def _signature(fn, constexprs: dict, dtype: str = "fp16") -> dict[str, str]:
    """Argument types: constexprs as given, `dtype` tensors, int32 index tables, fp32 scales, int32 scalars."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            index = any(k in name for k in ("cnt", "idx", "lens", "ids", "count"))
            sig[name] = POINTERS.get(name, "*i32" if index else f"*{dtype}")
        else:
            sig[name] = "fp32" if name.endswith("scale") else "i32"
    return sig


def compile_all() -> dict[str, dict]:
    """The child: compile every case for sm_90; per case whether it compiled, and what its PTX holds."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    out = {}
    for case, (module, kernel, constexprs, warps, stages, *dtype) in CASES.items():
        fn = getattr(importlib.import_module(f"longexposure.kernels.{module}"), kernel)
        while not isinstance(fn, JITFunction):  # autotuner and heuristics wrappers
            fn = fn.fn
        try:
            constexprs = {**constexprs, **{name: 1 for name in fn.arg_names if name in UNIT_STRIDES}}
            signature = _signature(fn, constexprs, *dtype)
            aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                       if signature[name].startswith("*") or signature[name] == "i32"}
            src = ASTSource(fn, signature=signature, constexprs=constexprs, attrs=aligned)
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": warps, "num_stages": stages})
            ptx = compiled.asm["ptx"]
            out[case] = {"ok": bool(compiled.asm.get("cubin")), "bulk_tensor_copy": "cp.async.bulk.tensor" in ptx,
                         "bulk_tensor_add": bool(re.search(r"cp\.reduce\.async\.bulk\.tensor\S*\.add", ptx)),
                         "f32_reduction": bool(re.search(r"\b(?:red|atom)\.global\S*\.add(?:\.v[248])?\.f32", ptx)),
                         "async_copies": len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)),
                         "shared_bytes": compiled.metadata.shared}
        except Exception as exc:  # noqa: BLE001 - reported per case by the parent
            out[case] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[-1500:]}"}
    return out


def test_every_kernel_variant_compiles_for_sm90():
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default either way; set, so newer Triton does not warn
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert child.returncode == 0, child.stderr[-4000:]
    got = json.loads(child.stdout.splitlines()[-1])
    failed = {case: r.get("error") for case, r in got.items() if not r["ok"]}
    assert not failed, failed
    assert set(got) == set(CASES)
    for case, r in got.items():
        constexprs = CASES[case][2]
        assert r["bulk_tensor_copy"] == constexprs.get("USE_TMA", False), f"{case}: TMA copies {r}"
        atomic = constexprs.get("DQ_ATOMIC", 0) == 1 or case.startswith("mlp sdd")  # sdd's LoRA output: atomics
        assert r["f32_reduction"] == atomic, f"{case}: fp32 atomics {r}"
        assert r["bulk_tensor_add"] == (constexprs.get("DQ_ATOMIC", 0) == 2), f"{case}: bulk reduce-adds {r}"
        if case.startswith("mlp"):  # LONGEXPOSURE_AUTOTUNE=0's tile above all: no autotuner can skip it
            assert r["shared_bytes"] <= SHARED_LIMIT_SM90, f"{case}: does not fit an SM's shared memory {r}"
        if case.startswith("mlp") and "fallback" not in case:
            stages, tile_bytes = CASES[case][4], 2 * (constexprs["BM"] + constexprs["BN"]) * constexprs["BK"]
            # a persistent pointer-path loop (tiles and K flattened into one) keeps one stage fewer in Triton 3.9
            stages -= constexprs.get("PERSISTENT", False) and not constexprs["USE_TMA"]
            assert r["shared_bytes"] >= stages * tile_bytes, f"{case}: main loop not {stages}-stage buffered {r}"
            assert r["bulk_tensor_copy"] or r["async_copies"] > 0, f"{case}: operands not copied asynchronously {r}"


if __name__ == "__main__":  # the child of the test above, without TRITON_INTERPRET
    print(json.dumps(compile_all()))
