#!/usr/bin/env bash
# One lent-GPU call's worth of measurements, batched (the device tool allows 10 minutes per command and
# brings back at most 8 files from $OUT, so everything lands in one archive plus a log).
#
#   bash benchmarks/device_session.sh e2e        # GPU tests of the graph step, step profiles, fig7
#   bash benchmarks/device_session.sh suites     # fig8, fig10, fig13 (resume where a call stopped)
#   bash benchmarks/device_session.sh operators  # attention fwd+bwd, MLP quick, predictor cost
#
# Needs: LONGEXPOSURE_SHARED pointing at a copy of shared/ (reference profile), $OUT (the device tool's
# output folder). Each stage has its own time limit so the archive is always written.
set -u
stage=${1:?usage: device_session.sh e2e|suites|operators}
out=${OUT:?set OUT}
work=$out/work
mkdir -p "$work"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$work/install.log" 2>&1 || {
  echo "install failed"; tail -20 "$work/install.log"; }
log=$out/$stage.log
run() {  # run LIMIT_SECONDS CMD...: time-limited, output appended to the stage log
  local limit=$1; shift
  echo "== $(date +%T) $*" | tee -a "$log"
  timeout "$limit" "$@" >>"$log" 2>&1
  echo "== rc $?" | tee -a "$log"
}
case $stage in
  e2e)
    run 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graph_step.py
    run 150 python3 benchmarks/profile_step.py --seq 1024 --variants sdpa-graph,le-graph,le-compile \
      --out "$work/profile_graph_s1024.json"
    run 270 longexposure run suites/fig7.yaml --preset paper --only method=lora --out "$work"
    ;;
  suites)
    run 200 longexposure run suites/fig7.yaml --preset paper --out "$work"
    run 150 longexposure run suites/fig10.yaml --preset paper --out "$work"
    run 150 longexposure run suites/fig13.yaml --preset paper --out "$work"
    ;;
  operators)
    run 200 python3 benchmarks/bench_attention_operator.py --skip compile --quick-check --out "$work/attention.json"
    run 150 python3 benchmarks/bench_mlp_operator.py --quick --out "$work/mlp_quick.json"
    run 120 python3 benchmarks/bench_predictors.py cost --fixed-capacity --in-step --out "$work/predictor_cost.json"
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
tar czf "$out/$stage.tgz" -C "$work" . && rm -rf "$work"
grep "^==" "$log"
