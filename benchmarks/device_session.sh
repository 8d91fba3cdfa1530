#!/usr/bin/env bash
# One lent-GPU call's worth of measurements, batched (the device tool allows 10 minutes per command and
# brings back at most 8 files from $OUT, so everything lands in one archive plus a log).
#
#   bash benchmarks/device_session.sh e2e        # GPU tests of the graph step, step profiles, fig7
#   bash benchmarks/device_session.sh predictors # graph-step test with compiled predictors; predictor cost --compile
#   bash benchmarks/device_session.sh tma        # MLP kernels with tensor descriptors: GPU test, per-kernel A/B
#   bash benchmarks/device_session.sh tma-ab     # per-kernel pointer vs descriptor A/B first, then the GPU tests
#   bash benchmarks/device_session.sh store-ab   # sdd's descriptor store: pointer / descriptors / + persistent per
#                                                # kernel at densities 1.0 and 0.62 (and 0.62 scattered over 4096
#                                                # tokens, fig7's step), the GPU tests, attention at D 128
#   bash benchmarks/device_session.sh store-e2e  # store-ab's MLP half (tests, density 1.0, scattered 0.62) and fig7's
#                                                # step with E2E_SWITCHES (on side only), in one call
#   bash benchmarks/device_session.sh bits-order # the ReLU bits in MMA thread order: GPU tests, per-kernel tables at
#                                                # density 1.0 and fig7's scattered shape
#   bash benchmarks/device_session.sh narrow     # half-width sdd / wgrad tiles at low counts: GPU tests, kernel profiles,
#                                                # the MLP quick table with and without them
#   bash benchmarks/device_session.sh switches-e2e  # fig7 compile + graph steps without / with E2E_SWITCHES (default
#                                                # LONGEXPOSURE_TMA=1: the MLP's descriptors), two runs
#   bash benchmarks/device_session.sh methods    # predictor cost under CUDA graphs, fig7's other methods at 1024
#   bash benchmarks/device_session.sh suites     # fig8, fig10, fig13 (resume where a call stopped)
#   bash benchmarks/device_session.sh operators  # attention fwd+bwd, MLP quick, predictor cost
#   bash benchmarks/device_session.sh operators-quick  # attention 0/50/80% + MLP quick (about 6 minutes)
#   bash benchmarks/device_session.sh attn-ab    # attention: default vs dQ by atomics vs descriptor loads,
#                                                # (ATTN_VARIANTS="default dq-atomic dq-bulk": dQ by bulk reduce-adds)
#                                                # correctness per variant, 0/50/80/90% at S 1024/2048
#                                                # (ATTN_HEAD_DIMS="64 128": head dims, each against its sdpa)
#   bash benchmarks/device_session.sh attn-bulk  # LONGEXPOSURE_BSA_DQ=bulk: its GPU tests, then default vs bulk at D 64
#                                                # (0/50/80/90%, S 1024/2048: BULK_SPARSITIES, BULK_SEQ), then the
#                                                # D 128 table (the pruned forward; BULK_D128=0 leaves it out)
#   bash benchmarks/device_session.sh attn-revision # two revisions of the attention kernels in one process:
#                                                # OLD_MODULE=<file> (`git show REV:kernels/block_sparse_attention.py`
#                                                # written into the checkout here: an untracked file travels; the
#                                                # device's .git can be stale; several files: one column each, the
#                                                # first the reference), AB_SET="NAME=VALUE" a further column,
#                                                # AB_GRAFT="NAME=FILE:dq" a column with one kernel from FILE,
#                                                # ATTN_SEQ="2048" the lengths, AB_FORCED=1 every kernel held to
#                                                # each of its configs on both layouts (`--forced`)
#   bash benchmarks/device_session.sh mlp-revision  # OLD_MODULE=<file>: the MLP GPU test, then two revisions of the
#                                                # MLP kernels in one process (fc1, fc2, dZ, frozen backward per count)
#   bash benchmarks/device_session.sh attn-ceiling  # the Triton attention ceiling (tutorial-shaped forward) beside
#                                                # sdpa and the block-sparse forward, its forced configs; D 64, D 128
#   bash benchmarks/device_session.sh relu       # pretrain relu-small (~3 min), fig11 (reordered neurons)
#   bash benchmarks/device_session.sh relu-refresh   # pretrain relu-small, fig11 dense / live / refreshed predictors
#   bash benchmarks/device_session.sh relu-profiles  # pretrain relu-small, fig9_time, fig9_sparsity
#   bash benchmarks/device_session.sh peers      # SP-LoRA fused kernels + splora_fig1, sylva_fig5
#   bash benchmarks/device_session.sh peers-check  # bench_peers correctness + SP-LoRA breakdown only
#   bash benchmarks/device_session.sh splora     # splora_fig1 only
#   bash benchmarks/device_session.sh ideal      # fig7 LoRA at 1024, all variants incl. the ideal-MLP yardsticks
#   bash benchmarks/device_session.sh memory     # fig8 (peak memory vs sequence length), sylva_table2
#   bash benchmarks/device_session.sh act-l1     # relu-small pretrained with / without --act-l1: block density
#   bash benchmarks/device_session.sh relu-quality  # predictor quality (recall, mass, density) + fig9_sparsity
#   bash benchmarks/device_session.sh real-prep  # GPU tests (graph + compile + refresh), pretrain relu-base (cached)
#   bash benchmarks/device_session.sh real-sweep # relu-base with act_group_l1 0 / 0.3 / 1 (600 steps each): held-out
#                                                # E2E d90; the best then pretrained in full into the cache
#   bash benchmarks/device_session.sh real-run   # e2e_real on relu-base (pretrains it first if not cached; resumes)
#   bash benchmarks/device_session.sh real-control  # issue 17: theta 0.5 refreshed every 100 steps (recall 0.97 and 0.9)
#                                                # beside random blocks at the 0.9 row's density, both dense baselines
#   bash benchmarks/device_session.sh real-corpus   # issue 17's control where the model's MLP knows the domain: the same
#                                                # rows fine-tuned on the pretraining corpus (held out: its tail);
#                                                # CORPUS_VARIANTS=a,b picks the rows beside the dense baselines
#   bash benchmarks/device_session.sh real-profile  # step profiles of e2e_real's dense and Long Exposure compiled +
#                                                # graph steps on relu-base, and of a predictor refresh on its own
#   bash benchmarks/device_session.sh strongest  # fig7 LoRA at 1024 against the compiled + graph baseline, profiles
#   bash benchmarks/device_session.sh strongest-methods  # fig7's Adapter and BitFit rows at 1024, graph and compiled
#   bash benchmarks/device_session.sh bits-tiles # fig7 compile + graph (dense, paper order, reordered), the MLP kernels'
#                                                # tile spaces A/B per density, the ReLU bits' GPU tests
#   bash benchmarks/device_session.sh table4     # Table IV: LoRA per variant on relu-base, lm-eval on held-out E2E
#                                                # (needs the eval wheels: carry .whl, docs/notes/device_wheels.md)
#
# LONGEXPOSURE_CACHE set outside (an ignored folder of the checkout, e.g. $PWD/cache) keeps checkpoints
# between calls while the machine stays warm: the relu* stages then reuse a cached relu-small instead of
# pretraining it again, and act-l1 keeps its checkpoints under $LONGEXPOSURE_CACHE/act-l1.
#
# LONGEXPOSURE_GIT: the commit, written out where it was made (`LONGEXPOSURE_GIT=a925565`, not `$(git rev-parse ...)`
# run on the device: the device's copy of .git can be stale, and at a925565 it named an older commit).
# Needs: LONGEXPOSURE_SHARED pointing at a copy of shared/, or that copy at .carry/shared (reference profile; for
# `relu` also data/e2e and data/opt-tokenizer), $OUT (the device tool's output folder); `relu` also
# LONGEXPOSURE_CORPUS, the tokenized corpus (`<cache>/corpus/python3.11-doc/tokens.opt.npy` made by a CPU pretrain
# run), since the device has no network. Each stage has its own time limit so the archive is always written.
# The stage writes $OUT/<stage>.tgz itself and then deletes $OUT/work: a caller that archives work/ again after it
# overwrites that archive with an empty one (run 13 of e2e_real lost its results.jsonl so; read the log instead).
set -u
stage=${1:?usage: device_session.sh e2e|predictors|tma|tma-ab|store-ab|store-e2e|bits-order|bits-tma|defaults|narrow|switches-e2e|attn-ab|attn-bulk|attn-revision|mlp-revision|attn-ceiling|methods|suites|operators|operators-quick|relu|relu-refresh|relu-profiles|relu-quality|peers|peers-check|splora|ideal|memory|act-l1|real-prep|real-sweep|real-run|real-control|real-corpus|real-profile|strongest|strongest-methods|bits-tiles|table4}
out=${OUT:?set OUT}
work=$out/work
mkdir -p "$work"
export LONGEXPOSURE_CACHE=${LONGEXPOSURE_CACHE:-$work/cache}  # under $work it is deleted before archiving
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$work/install.log" 2>&1 || {
  echo "install failed"; tail -20 "$work/install.log"; }
log=$out/$stage.log
# the carried copy of shared/ (`mkdir -p .carry/shared && cp -r ../shared/reference .carry/shared/`, run's carry
# [".carry"]) is found without the variable; without either, say so first: replayed profiles then fail by name
[ -z "${LONGEXPOSURE_SHARED:-}" ] && [ -d .carry/shared ] && export LONGEXPOSURE_SHARED=$PWD/.carry/shared
[ -d "${LONGEXPOSURE_SHARED:-/nonexistent}/reference" ] ||
  echo "== no LONGEXPOSURE_SHARED/reference: stages that replay the reference profile will fail" | tee -a "$log"
pretrain_relu_small() {  # a cached relu-small (from an earlier call on this machine) is reused, and said so
  if [ -f "$LONGEXPOSURE_CACHE/relu-small/config.json" ]; then
    echo "== using cached $LONGEXPOSURE_CACHE/relu-small: $(grep -o '"act_l1": [0-9.]*' "$LONGEXPOSURE_CACHE/relu-small/pretrain.json")" | tee -a "$log"
  else
    run 240 longexposure pretrain --preset relu-small
  fi
}
pretrain_relu_base() {  # relu-base for the e2e_real suite: reused from $LONGEXPOSURE_CACHE while the machine stays warm
  if [ -f "$LONGEXPOSURE_CACHE/relu-base/pretrain.json" ]; then echo "== cached relu-base" | tee -a "$log"
  else run 420 longexposure pretrain --preset relu-base ${PRETRAIN_ARGS:-}; fi  # the recipe's own time budget is 330 s
  cp "$LONGEXPOSURE_CACHE/relu-base/pretrain.json" "$work/relu_base_pretrain.json" 2>/dev/null
}
run() {  # run LIMIT_SECONDS CMD...: time-limited, output appended to the stage log
  local limit=$1; shift
  echo "== $(date +%T) $*" | tee -a "$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "== rc $?" | tee -a "$log"
}
mlp_kernels() {  # mlp_kernels NAME LIMIT ARGS...: per-kernel times, pointer / descriptors / + persistent, library tiles
  local name=$1 limit=$2; shift 2
  run "$limit" python3 benchmarks/bench_mlp_operator.py --diagnose "$work/$name.json" --diagnose-spaces library \
    --diagnose-persistent "$@"
}
fig7_switches() {  # fig7_switches SIDES LIMIT: fig7's three compile + graph LoRA rows without (off) / with (on) the
  # switches in E2E_SWITCHES, one process a side, each beside the strongest dense baseline; written to switches.txt
  # (default since 5ca8a49, where descriptors + persistent became Hopper's default: the pointer loads of before)
  local switches=${E2E_SWITCHES:-LONGEXPOSURE_TMA=0 LONGEXPOSURE_PERSISTENT=0} side
  echo "$switches" > "$work/switches.txt"
  for side in $1; do
    ( [ "$side" = on ] && export $switches
      run "$2" longexposure run suites/fig7.yaml --preset paper --keep-going \
        --out "$work/switches-$side" --only method=lora --only seq_len=1024 \
        --only variant=peft-sdpa-compile-graph,long-exposure-compile-graph,long-exposure-reordered-compile-graph )
  done
}
case $stage in
  e2e)
    run 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph_step.py
    run 150 python3 benchmarks/profile_step.py --seq 1024 --variants sdpa-graph,le-graph \
      --out "$work/profile_graph_s1024.json"
    run 270 longexposure run suites/fig7.yaml --preset paper --only method=lora --out "$work"
    ;;
  methods)  # resumes the committed fig7 rows, so only the missing cases run
    mkdir -p "$work/fig7" && cp -r artifacts/fig7/paper "$work/fig7/paper"
    run 120 python3 benchmarks/bench_predictors.py cost --fixed-capacity --in-step --graph \
      --out "$work/predictor_cost_graph.json"
    run 300 longexposure run suites/fig7.yaml --preset paper --only seq_len=1024 --out "$work"
    ;;
  predictors)
    run 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph_step.py -k predicted-compiled
    run 300 python3 benchmarks/bench_predictors.py cost --fixed-capacity --in-step --graph --compile \
      --out "$work/predictor_cost_graph_compiled.json"
    ;;
  tma-ab)  # pointer vs descriptor per kernel (ms, TFLOP/s, cuBLAS beside), then the descriptor path's GPU test
    run "${AB_LIMIT:-300}" python3 benchmarks/bench_mlp_operator.py --diagnose "$work/mlp_kernels_tma_ab.json"
    # the compiled path: Inductor launching the descriptor kernels. One tile config (LONGEXPOSURE_AUTOTUNE=0): these
    # check numbers, and autotuning every shape hypothesis draws ran past 180 s with no test done (H100, 1be31af)
    LONGEXPOSURE_AUTOTUNE=0 run "${TEST_LIMIT:-240}" python3 -m pytest -q -p no:cacheprovider \
      tests/test_neuron_block_mlp.py -k "descriptor or compile_traces or persistent"
    ;;
  store-ab)  # issue 21: sdd stores its tile through a descriptor since ec66ef2 (opt-in with LONGEXPOSURE_TMA); then
    # fig7's step with it: E2E_SWITCHES="LONGEXPOSURE_TMA=sdd,dsd LONGEXPOSURE_PERSISTENT=1" ... switches-e2e
    mlp_kernels mlp_kernels_store "${AB_LIMIT:-150}" --diagnose-densities 1.0 0.62
    # fig7's paper-order step: 4096 tokens, the blocks scattered (sdd's tiles gather their weight rows)
    mlp_kernels mlp_kernels_scattered "${AB_LIMIT:-150}" --diagnose-densities 0.62 --diagnose-scattered \
      --diagnose-tokens 4096
    LONGEXPOSURE_AUTOTUNE=0 run "${TEST_LIMIT:-80}" python3 -m pytest -q -p no:cacheprovider \
      tests/test_neuron_block_mlp.py -k "descriptor or persistent"
    run "${ATTN_LIMIT:-150}" python3 benchmarks/bench_attention_operator.py --quick-check --skip compile layout \
      correctness --backends sdpa triton --blocks 64 --sparsities 0 0.5 0.8 0.9 --triton-variants default \
      --head-dims 128 --out "$work/attention_d128.json"
    ;;
  store-e2e)  # one call: the descriptor-store GPU tests, sdd / dsd per kernel at density 1.0 and scattered 0.62 over
    # 4096 tokens (pointer / descriptors / + persistent), then fig7's step with the switches (the on side only)
    LONGEXPOSURE_AUTOTUNE=0 run "${TEST_LIMIT:-60}" python3 -m pytest -q -p no:cacheprovider \
      tests/test_neuron_block_mlp.py -k "store_stops or persistent_kernels"
    mlp_kernels mlp_kernels_store "${AB_LIMIT:-95}" --diagnose-densities 1.0
    mlp_kernels mlp_kernels_scattered "${AB_LIMIT:-95}" --diagnose-densities 0.62 --diagnose-scattered \
      --diagnose-tokens 4096
    fig7_switches on "${E2E_LIMIT:-250}"
    ;;
  bits-order)  # issue 21: the ReLU bits in the order a Hopper MMA thread holds them (fc1's epilogue packs without
    # warp shuffles): the GPU tests that read them, then per kernel at density 1.0 (BITS_EPILOGUES=1: with fc1's
    # epilogue taken apart) and at fig7's scattered shape
    LONGEXPOSURE_AUTOTUNE=0 run "${TEST_LIMIT:-150}" python3 -m pytest -q -p no:cacheprovider \
      tests/test_neuron_block_mlp.py -k "relu_bits_are or every_gradient or store_stops"
    mlp_kernels mlp_kernels_bits "${AB_LIMIT:-150}" --diagnose-densities 1.0 ${BITS_EPILOGUES:+--diagnose-epilogues}
    mlp_kernels mlp_kernels_bits_scattered "${AB_LIMIT:-140}" --diagnose-densities 0.62 --diagnose-scattered \
      --diagnose-tokens 4096
    ;;
  bits-tma)  # issue 21: fc1 stores the ReLU bits through a descriptor (LONGEXPOSURE_TMA's sdd, tiles 128+ wide): the
    # GPU tests that read the bits with descriptors on, then per kernel as in bits-order (fc1's epilogue taken apart)
    LONGEXPOSURE_AUTOTUNE=0 LONGEXPOSURE_TMA=sdd run "${TEST_LIMIT:-150}" python3 -m pytest -q -p no:cacheprovider \
      tests/test_neuron_block_mlp.py -k "relu_bits_are or stored_through or store_stops or relu_boundary or rejects_bits"
    if [ -z "${BITS_TESTS_ONLY:-}" ]; then  # BITS_TESTS_ONLY=1: the tests alone
      mlp_kernels mlp_kernels_bits "${AB_LIMIT:-210}" --diagnose-densities 1.0 --diagnose-epilogues
      mlp_kernels mlp_kernels_bits_scattered "${AB_LIMIT:-140}" --diagnose-densities 0.62 --diagnose-scattered \
        --diagnose-tokens 4096
    fi
    ;;
  defaults)  # issue 21: descriptors + the persistent schedule for sdd and dsd by default (TMA_DEFAULT): the GPU tests
    # with no switch set; fig7's compiled + graph step with the defaults (side "off") beside the old defaults (side
    # "on": LONGEXPOSURE_TMA=0 LONGEXPOSURE_PERSISTENT=0, pointer loads one program per tile); the operator's quick table
    ( unset LONGEXPOSURE_TMA LONGEXPOSURE_PERSISTENT
      LONGEXPOSURE_AUTOTUNE=0 run "${TEST_LIMIT:-120}" python3 -m pytest -q -p no:cacheprovider \
        tests/test_neuron_block_mlp.py -k "relu_bits_are or stored_through or store_stops or relu_boundary or \
        rejects_bits or persistent_grid or switch_names or compile_traces" )
    fig7_switches "off on" "${E2E_LIMIT:-230}"
    [ -z "${SKIP_QUICK:-}" ] && run "${QUICK_LIMIT:-170}" python3 benchmarks/bench_mlp_operator.py --quick \
      --out "$work/mlp_quick.json"
    ;;
  narrow)  # issue 21: sdd / wgrad's half-width tiles at low counts (LONGEXPOSURE_NARROW) and LoRA's narrow weight-
    # gradient tiles: the GPU tests of both; with PROFILE=1 each quick-grid case's kernels (torch.profiler: about 200 s
    # of autotuning); the quick table with the defaults and (unless SKIP_OFF) with LONGEXPOSURE_NARROW=0, one process
    # each; with E2E=1 fig7's compiled + graph LoRA step with the defaults
    LONGEXPOSURE_AUTOTUNE=0 run "${TEST_LIMIT:-150}" python3 -m pytest -q -p no:cacheprovider \
      tests/test_neuron_block_mlp.py -k "${TESTS:-half_width or writes_every_row or narrow_switch}"
    [ -n "${PROFILE:-}" ] && run "${PROFILE_LIMIT:-240}" python3 benchmarks/bench_mlp_operator.py \
      --profile "$work/mlp_profile.json"
    # with DIAG=1: each kernel at densities 1.0 and 0.1 (its own capacity), Hopper's defaults; wgrad with the inactive
    # rows zeroed in the kernel beside a zero fill + the products
    [ -n "${DIAG:-}" ] && run "${AB_LIMIT:-150}" python3 benchmarks/bench_mlp_operator.py \
      --diagnose "$work/mlp_kernels.json" --diagnose-spaces library --diagnose-densities 1.0 0.1 \
      --diagnose-modes defaults
    run "${QUICK_LIMIT:-170}" python3 benchmarks/bench_mlp_operator.py --quick --out "$work/mlp_quick.json"
    [ -z "${SKIP_OFF:-}" ] && LONGEXPOSURE_NARROW=0 run "${QUICK_LIMIT:-170}" python3 benchmarks/bench_mlp_operator.py \
      --quick --out "$work/mlp_quick_narrow_off.json"
    [ -n "${E2E:-}" ] && fig7_switches off "${E2E_LIMIT:-150}"  # fig7's compiled + graph step with the defaults
    # fc2's bias gradient (the column sums of dy): torch's reduction beside cuBLAS's matrix-vector product, graph-timed
    [ -n "${BIAS_SUM:-}" ] && run 60 python3 -c "
import torch, triton.testing as tt
for t in (2048, 4096):
    dy = torch.randn(t, 2048, device='cuda', dtype=torch.float16); ones = dy.new_ones(t)
    ref = dy.double().sum(0)
    err = lambda g: float((g.double() - ref).norm() / ref.norm())
    g = lambda f: tt.do_bench_cudagraph(f, rep=40, return_mode='median') * 1e3
    print(f'tokens {t}: dy.sum(0) {g(lambda: dy.sum(0)):.2f} us (err {err(dy.sum(0)):.1e}), '
          f'mv(dy.t(), ones) {g(lambda: torch.mv(dy.t(), ones)):.2f} us (err {err(torch.mv(dy.t(), ones)):.1e})')"
    ;;
  switches-e2e)  # fig7's paper-order and reordered Long Exposure steps (compile + graph) without, then with the
    # kernel switches in E2E_SWITCHES (default: the MLP's pointer loads one program per tile, the defaults before
    # 5ca8a49; up to 8207219 it was the then opt-in descriptors + persistent for sdd and dsd; e.g.
    # E2E_SWITCHES="LONGEXPOSURE_BSA_DQ=atomic LONGEXPOSURE_BSA_TMA=1" for attention's), each run beside the strongest
    # dense baseline of its own process; the switches are written to switches.txt
    fig7_switches "${E2E_SIDES:-off on}" "${E2E_LIMIT:-280}"  # E2E_SIDES=on: the switched side only
    ;;
  tma)  # LONGEXPOSURE_TMA=1 correctness on the real kernels, then pointer vs descriptor kernel times
    LONGEXPOSURE_AUTOTUNE=0 run 240 python3 -m pytest -q -p no:cacheprovider tests/test_neuron_block_mlp.py -k descriptor
    # (per-kernel A/B, `bench_mlp_operator.py --diagnose`, ran on 2026-11-23: artifacts/fig12_mlp run 6)
    LONGEXPOSURE_TMA=1 run 200 python3 benchmarks/bench_mlp_operator.py --quick --out "$work/mlp_quick_tma.json"
    ;;
  suites)  # fig7 resumes the committed rows, so only the missing cases (other methods at 512) run
    mkdir -p "$work/fig7" && cp -r artifacts/fig7/paper "$work/fig7/paper"
    run 200 longexposure run suites/fig7.yaml --preset paper --out "$work"
    run 150 longexposure run suites/fig10.yaml --preset paper --out "$work"
    run 150 longexposure run suites/fig13.yaml --preset paper --out "$work"
    ;;
  operators)
    run 200 python3 benchmarks/bench_attention_operator.py --skip compile --quick-check --triton-variants default \
      --out "$work/attention.json"
    run 150 python3 benchmarks/bench_mlp_operator.py --quick --out "$work/mlp_quick.json"
    run 120 python3 benchmarks/bench_predictors.py cost --fixed-capacity --in-step --out "$work/predictor_cost.json"
    ;;
  operators-quick)  # attention at 0 / 50 / 80% block sparsity and the MLP quick table, for a short lease
    run 170 python3 benchmarks/bench_attention_operator.py --skip compile --quick-check --sparsities 0 0.5 0.8 \
      --blocks 64 --triton-variants default --out "$work/attention.json"
    # 300 s: on a cold H100 (9355523) its autotuning took 130 s of 150 before the graph-timed rows
    run 300 python3 benchmarks/bench_mlp_operator.py --quick --out "$work/mlp_quick.json"
    ;;
  attn-ab)  # issue 21: the attention kernels' opt-in switches (dQ by atomics, descriptor loads, query pairs; ATTN_VARIANTS
    # picks them) beside the default,
    # one process, each against the same sdpa rows, correctness per variant first (about 8 minutes: each variant
    # autotunes its own kernels; the compile check and the combined variant wait until one of them wins)
    run "${AB_LIMIT:-570}" python3 benchmarks/bench_attention_operator.py --quick-check --skip layout compile \
      --backends sdpa triton --blocks 64 --sparsities 0 0.5 0.8 0.9 --triton-variants ${ATTN_VARIANTS:-default dq-atomic tma pair} \
      --head-dims ${ATTN_HEAD_DIMS:-64} --out "$work/attention_ab.json"
    # MLP_QUICK_LIMIT=0 leaves out the MLP quick table (when tma-ab's per-kernel table ran in the same lease)
    # (140 s is short of a cold machine's MLP autotuning, as operators-quick found: MLP_QUICK_LIMIT=300 with fewer
    # ATTN_VARIANTS where the lease allows it)
    [ "${MLP_QUICK_LIMIT:-140}" -gt 0 ] && run "${MLP_QUICK_LIMIT:-140}" python3 benchmarks/bench_mlp_operator.py --quick \
      --out "$work/mlp_quick.json"
    ;;
  attn-bulk)  # issue 21: dQ by bulk reduce-adds (c456d87): correctness, then speed beside the dQ pass (9355523: slower)
    # a short lease (about 3 minutes): BULK_D128=0 BULK_SEQ=2048 BULK_SPARSITIES="0 0.9"
    run 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_block_sparse_attention.py -k bulk
    run 250 python3 benchmarks/bench_attention_operator.py --quick-check --skip layout compile --backends sdpa triton \
      --blocks 64 --seq ${BULK_SEQ:-1024 2048} --sparsities ${BULK_SPARSITIES:-0 0.5 0.8 0.9} \
      --triton-variants default dq-bulk --head-dims 64 --out "$work/bulk_ab.json"
    [ "${BULK_D128:-1}" = 1 ] &&  # BULK_D128=0 leaves the D 128 table out (a short lease)
      run 150 python3 benchmarks/bench_attention_operator.py --skip layout compile correctness --backends sdpa triton \
      --blocks 64 --sparsities 0 0.5 0.8 0.9 --triton-variants default --head-dims 128 --out "$work/d128.json"
    ;;
  attn-revision)  # a kernel change beside the revision before it, same process (benchmarks/attention_revision_ab.py)
    run "${AB_LIMIT:-540}" python3 benchmarks/attention_revision_ab.py --old ${OLD_MODULE:?set OLD_MODULE} \
      ${AB_SET:+--set $AB_SET} ${AB_GRAFT:+--graft $AB_GRAFT} ${AB_FORCED:+--forced} \
      --head-dims ${ATTN_HEAD_DIMS:-64 128} --seq ${ATTN_SEQ:-1024 2048} --out "$work/revision_ab.json"
    ;;
  mlp-revision)  # an MLP kernel change beside the revision before it, same process (benchmarks/mlp_revision_ab.py;
    # OLD_MODULE=<file>, e.g. `git show REV:kernels/neuron_block_mlp.py` written into the checkout or carried in .carry/)
    run 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_neuron_block_mlp.py
    run "${AB_LIMIT:-330}" python3 benchmarks/mlp_revision_ab.py --old ${OLD_MODULE:?set OLD_MODULE} \
      --out "$work/mlp_revision_ab.json"
    ;;
  attn-ceiling)  # issue 21: how far a plain Triton forward gets on these shapes (each head dim its own time limit)
    for d in 64 128; do
      run 280 python3 benchmarks/attention_ceiling.py --head-dims "$d" --forced-configs --out "$work/ceiling_d$d.json"
    done
    ;;
  relu)  # one call: a fresh machine has no cached checkpoint, and it is too large to bring back
    # (fig9_time and fig9_sparsity ran on 2026-11-23: `relu-profiles` reruns them)
    pretrain_relu_small
    run 330 longexposure run suites/fig11.yaml --preset paper --out "$work"
    ;;
  peers)  # SP-LoRA's fused kernels (GPU tests, correctness, per-layer pieces, 7B steps), Sylva Fig. 5
    run 150 python3 -m pytest -q -p no:cacheprovider tests/test_masked_low_rank.py
    run 200 python3 benchmarks/bench_peers.py --sections correctness,splora-breakdown,splora --out "$work/peers.json"
    run 90 longexposure run suites/sylva_fig5.yaml --preset paper --out "$work"
    run 120 longexposure run suites/splora_fig1.yaml --preset paper --out "$work"
    ;;
  peers-check)  # bench_peers' GPU correctness checks and SP-LoRA's per-layer breakdown (no suites)
    run 150 python3 benchmarks/bench_peers.py --sections correctness,splora-breakdown --out "$work/peers.json"
    ;;
  splora)  # SP-LoRA Fig. 1 alone (LoRA, the lora-wgrad yardstick, SP-LoRA and its variants, SPP)
    run 200 longexposure run suites/splora_fig1.yaml --preset paper --out "$work"
    ;;
  ideal)  # fig7's LoRA rows at seq 1024, every variant side by side, with the ideal-MLP yardsticks
    run 420 longexposure run suites/fig7.yaml --preset paper --only method=lora --only seq_len=1024 --out "$work"
    ;;
  memory)  # Fig. 8 (peak memory vs sequence length: full, LoRA eager / sdpa, Long Exposure + LoRA), Sylva Table 2
    run 300 longexposure run suites/fig8.yaml --preset paper --out "$work"
    run 200 longexposure run suites/sylva_table2.yaml --preset paper --out "$work"
    ;;
  act-l1)  # relu-small pretrained with and without an activation-L1 penalty: held-out block density at 90% mass
    run 570 python3 benchmarks/act_l1_sweep.py --preset relu-small --act-l1 0 1 --blocks 64 \
      --keep "$LONGEXPOSURE_CACHE/act-l1" --out "$work/act_l1_sweep_relu_small.json"
    ;;
  relu-refresh)  # fig11 on a fresh relu-small: dense LoRA, live predictors, and predictors refreshed in fine-tuning
    pretrain_relu_small
    for v in dense-lora long-exposure long-exposure-refresh; do
      run 200 longexposure run suites/fig11.yaml --preset paper --only variant=$v --out "$work"
    done
    ;;
  relu-profiles)
    pretrain_relu_small
    run 120 longexposure run suites/fig9_time.yaml --preset paper --out "$work"
    run 200 longexposure run suites/fig9_sparsity.yaml --preset paper --out "$work"
    ;;
  relu-quality)  # the issue-5 numbers on relu-small: block density at 90% mass, predictor recall / mass / density
    pretrain_relu_small
    cp "$LONGEXPOSURE_CACHE/relu-small/pretrain.json" "$work/relu_small_pretrain.json"
    run 240 python3 benchmarks/bench_predictors.py quality --train-batches 16 --eval-batches 6 \
      --save "$work/predictors-relu-small" --out "$work/quality.json"
    rm -rf "$work/predictors-relu-small"  # only the reload check needed them
    run 330 longexposure run suites/fig9_sparsity.yaml --preset paper --out "$work"
    ;;
  real-prep)  # issue 17/18 GPU tests, then relu-base pretrained into $LONGEXPOSURE_CACHE (kept while warm)
    run 200 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph_step.py tests/test_refresh.py \
      -k "compiled or refresh or dense or fused or kept or captured"
    run 60 python3 benchmarks/bench_refresh.py --variants grouped grouped-kept --steps 20 --reps 5 \
      --out "$work/bench_refresh_kept.json"
    pretrain_relu_base
    ;;
  real-sweep)  # does a group-lasso term make relu-base's E2E patterns sparser? Then the best into the cache
    run "${SWEEP_LIMIT:-360}" python3 benchmarks/act_l1_sweep.py --preset relu-base --steps 600 --act-l1 3 \
      --act-group-l1 ${SWEEP_GROUPS:-0 0.3 1} --blocks 64 --out "$work/group_sweep_relu_base.json"
    group=$(python3 benchmarks/act_l1_sweep.py --pick "$work/group_sweep_relu_base.json" --max-loss-ratio 1.03)
    echo "== picked act_group_l1 ${group:-none}" | tee -a "$log"
    if [ -n "$group" ]; then PRETRAIN_ARGS="--act-group-l1 $group" pretrain_relu_base; fi
    ;;
  real-control|real-corpus)  # one call each (~330 / ~400 s with pretraining): the headline rows beside their controls
    # at the same density, on E2E (real-control) or on the pretraining corpus (real-corpus)
    if [ "$stage" = real-corpus ]; then  # CORPUS_VARIANTS: the rows beside the two dense baselines
      REAL_ONLY="--only dataset=corpus --only variant=dense-lora-sdpa-graph,dense-lora-compile-graph,${CORPUS_VARIANTS:-long-exposure-mlp-compile-graph-theta0.5-refresh100-recall0.9,random-mlp-theta0.5-as-predicted-recall0.9,random-mlp-theta0.5}"
    else
      REAL_ONLY="--only dataset=e2e --only variant=dense-lora-sdpa-graph,dense-lora-compile-graph,long-exposure-mlp-compile-graph-theta0.5-refresh100,long-exposure-mlp-compile-graph-theta0.5-refresh100-recall0.9,random-mlp-theta0.5-as-predicted-recall0.9"
    fi
    ;&  # then real-run's steps with that filter
  real-run)  # e2e_real (resumes: results live in $LONGEXPOSURE_CACHE/runs while the machine stays warm)
    pretrain_relu_base
    limit=${REAL_LIMIT:-$(( ${REAL_BUDGET:-575} - SECONDS ))}  # what is left of the call after pretraining
    # REAL_ONLY: extra `--only key=values` filters (e.g. "--only variant=dense-lora-sdpa-graph,random-mlp")
    run "$limit" longexposure run suites/e2e_real.yaml --preset paper --keep-going --out "$LONGEXPOSURE_CACHE/runs" ${REAL_ONLY:-}
    cp -r "$LONGEXPOSURE_CACHE/runs/e2e_real" "$work/" 2>/dev/null
    ;;
  real-profile)  # issue 17's "where the time went": relu-base (cached or pretrained first), then the profiles
    pretrain_relu_base
    run "${PROFILE_LIMIT:-300}" python3 benchmarks/profile_step.py --seq 1024 --steps 5 --warmup 4 \
      --variants "${PROFILE_VARIANTS:-e2e-compile-graph,e2e-le-mlp-compile-graph,e2e-le-mlp-theta0.3-compile-graph}" \
      --out "$work/profile_e2e_s1024.json"
    ;;
  strongest)  # fig7 LoRA at 1024: the compiled + graph dense baseline beside Long Exposure (paper and mass order)
    run "${FIG7_LIMIT:-360}" longexposure run suites/fig7.yaml --preset paper --keep-going --out "$work" --only method=lora \
      --only seq_len=1024 --only variant=peft-eager,peft-sdpa,peft-sdpa-graph,peft-sdpa-compile-graph,long-exposure-graph,long-exposure-compile-graph,long-exposure-reordered-graph,long-exposure-reordered-compile-graph,peft-sdpa-compile-graph-fused-ce,long-exposure-reordered-compile-graph-fused-ce
    run "${PROFILE_LIMIT:-150}" python3 benchmarks/profile_step.py --seq 1024 --steps 5 --warmup 4 \
      --variants "${PROFILE_VARIANTS:-sdpa-compile-graph,le-compile-graph,le-reordered-compile-graph}" \
      --out "$work/profile_strongest_s1024.json"
    # (the compiled / refresh / fused-loss GPU tests run in real-prep)
    ;;
  bits-tiles)  # issues 18 / 21: fig7's compile + graph steps with the ReLU bits and 256-wide sdd tiles, the per-kernel
    # A/B of the tile spaces (each density tuned at its own capacity), then the GPU tests of the bits.
    # FIG7_METHODS=lora,adapter,bitfit adds fig7's other methods (about 70 s each; raise E2E_LIMIT)
    run "${E2E_LIMIT:-190}" longexposure run suites/fig7.yaml --preset paper --keep-going --out "$work" \
      --only method="${FIG7_METHODS:-lora}" --only seq_len=1024 \
      --only variant=peft-sdpa-compile-graph,long-exposure-compile-graph,long-exposure-reordered-compile-graph
    run "${AB_LIMIT:-230}" python3 benchmarks/bench_mlp_operator.py --diagnose "$work/mlp_kernels_tiles.json"
    LONGEXPOSURE_AUTOTUNE=0 run "${TEST_LIMIT:-110}" python3 -m pytest -q -p no:cacheprovider \
      tests/test_neuron_block_mlp.py \
      -k "relu_bits or keeps_activations or relu_boundary or only_for_what or compile_traces or bias_gradient"
    ;;
  strongest-methods)  # issue 18: Adapter and BitFit at 1024 beside their own compiled + graph dense baselines
    run "${FIG7_LIMIT:-540}" longexposure run suites/fig7.yaml --preset paper --keep-going --out "$work" \
      --only method=adapter,bitfit --only seq_len=1024 --only variant=peft-sdpa-graph,peft-sdpa-compile-graph,long-exposure-compile-graph,long-exposure-reordered-compile-graph
    ;;
  table4)  # Table IV: the eval extra from carried wheels, a GPU smoke evaluate, relu-base, then the suite (resumes:
    # results live in $LONGEXPOSURE_CACHE/runs while the machine stays warm; set LONGEXPOSURE_CACHE=$PWD/cache outside)
    if ! ls .whl/*.whl >/dev/null 2>&1; then
      echo "== no .whl/*.whl: make them (docs/notes/device_wheels.md) and carry .whl" | tee -a "$log"
    else
      run 120 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
      run 60 python3 -c "import importlib.metadata as m, lm_eval.tasks, lm_eval.models.huggingface, datasets, sacrebleu
from rouge_score import rouge_scorer
print(' '.join(f'{d} {m.version(d)}' for d in ('lm_eval', 'datasets', 'pyarrow', 'fsspec', 'huggingface_hub', 'pandas', 'sacrebleu', 'transformers', 'torch')))"
      tail -2 "$log" | head -1  # the versions line
      run 120 longexposure evaluate --model opt-tiny --limit 3 --max-gen-toks 6 --batch-size 3 --out "$work/smoke"
      if tail -1 "$log" | grep -qx "== rc 0"; then
        pretrain_relu_base
        limit=${TABLE4_LIMIT:-$(( ${TABLE4_BUDGET:-570} - SECONDS ))}  # what is left of the call (the tool's 600 s)
        if [ "$limit" -ge 60 ]; then
          run "$limit" longexposure run suites/table4.yaml --preset paper --keep-going --out "$LONGEXPOSURE_CACHE/runs"
        else
          echo "== $limit s left after pretraining: call again while warm (relu-base is cached)" | tee -a "$log"
        fi
        cp -r "$LONGEXPOSURE_CACHE/runs/table4" "$work/" 2>/dev/null
      else
        echo "== the eval smoke test failed: table4 not run (see $stage.log)" | tee -a "$log"
      fi
    fi
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
rm -rf "$work/cache"  # weights and corpus stay on the machine
tar czf "$out/$stage.tgz" -C "$work" . && rm -rf "$work"
grep "^==" "$log"
