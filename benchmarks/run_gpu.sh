#!/usr/bin/env bash
# The one script a GPU session runs: GPU tests, the FF kernel benchmark and the end-to-end benchmark.
#
#   bash benchmarks/run_gpu.sh quick              the prepared check: at most 8 minutes on one H100/H200, every result
#                                                 in $OUT as soon as it exists (benchmarks/gpu_check.py says what)
#   bash benchmarks/run_gpu.sh [stage ...]        the longer stages below (default: all, in this order)
#
# The GPU machine has no aenum (caprese_peft registers its PEFT type with it) and cannot install from an index:
# before the device call, run `python -m pip download --no-deps -d .whl aenum` here, keep .whl out of git
# (`echo /.whl/ >> .git/info/exclude`) and name it in the call's `carry`; this script installs what .whl holds.
#
# Longer stages, with rough times on one H100 (a device command may run 10 minutes at most, so run a few per call):
#   env          versions, GPU, import check                                   < 1 min
#   tests        pytest -m "gpu or kernels" on the decode tests, on CUDA      ~ 3-5 min
#   kernels      benchmarks/bench_ff_kernels.py, both models, batch 1/4/8     ~ 4-6 min
#   e2e-llama-a  Llama-3.1-8B: dense, griffin, caprese-griffin                ~ 5-8 min
#   e2e-llama-b  Llama-3.1-8B: cats, caprese-cats                             ~ 4-6 min
#   e2e-qwen-a   Qwen2.5-14B: dense, griffin, caprese-griffin                 ~ 7-9 min
#   e2e-qwen-b   Qwen2.5-14B: cats, caprese-cats                              ~ 5-7 min
#   summary      benchmarks/results/e2e/summary.md from every e2e JSON so far  < 1 min
#
# E2E_COMPILE (default reduce-overhead) picks FastDecoder's compile mode for the e2e stages.
#
# Results land in benchmarks/results/ (ff_kernels_*.csv, e2e/*.json, e2e/*.md, logs/); when $OUT is set (the
# device runner), they are also copied there after every stage, so a stage cut off by the time limit still
# returns what it finished (bench_e2e.py rewrites its JSON after every variant). Commit them from there.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried for what the machine lacks
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if [ "${1:-}" = quick ]; then
    exec python3 benchmarks/gpu_check.py --out "${OUT:-benchmarks/results/quick}"
fi
E2E=(python3 benchmarks/bench_e2e.py --compile "${E2E_COMPILE:-reduce-overhead}")
RESULTS=benchmarks/results
mkdir -p "$RESULTS/logs" "$RESULTS/e2e"

copy_out() {
    if [ -n "${OUT:-}" ]; then
        mkdir -p "$OUT/results"
        cp -r "$RESULTS/logs" "$RESULTS/e2e" "$OUT/results/" 2>/dev/null || true
        cp "$RESULTS"/ff_kernels_*.csv "$OUT/results/" 2>/dev/null || true
    fi
}
trap copy_out EXIT

run() {  # run STAGE COMMAND...: log to results/logs/STAGE.log, keep going on failure
    local stage=$1
    shift
    echo "=== $stage: $*"
    "$@" 2>&1 | tee "$RESULTS/logs/$stage.log"
    local status=${PIPESTATUS[0]}
    echo "=== $stage exited with $status"
    copy_out
    return "$status"
}

stage() {
    case "$1" in
        env) run env bash -c 'nvidia-smi; git rev-parse --short HEAD; python3 -c "
import torch, transformers, triton, peft, caprese_peft, caprese_peft.kernels
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"transformers\", transformers.__version__,
      \"triton\", triton.__version__, \"peft\", peft.__version__, \"gpu\", torch.cuda.get_device_name())"' ;;
        tests) run tests python3 -m pytest -m "gpu or kernels" -q -rs \
            tests/test_kernels.py tests/test_merged_decode.py tests/test_fast_decode.py ;;
        kernels) run kernels python3 benchmarks/bench_ff_kernels.py --densities 0.3 0.5 0.7 ;;
        e2e-llama-a) run e2e-llama-a "${E2E[@]}" --models llama-3.1-8b --variants dense griffin caprese-griffin ;;
        e2e-llama-b) run e2e-llama-b "${E2E[@]}" --models llama-3.1-8b --variants cats caprese-cats ;;
        e2e-qwen-a) run e2e-qwen-a "${E2E[@]}" --models qwen2.5-14b --variants dense griffin caprese-griffin ;;
        e2e-qwen-b) run e2e-qwen-b "${E2E[@]}" --models qwen2.5-14b --variants cats caprese-cats ;;
        summary) run summary python3 benchmarks/bench_e2e.py --summarize ;;
        *) echo "unknown stage '$1'; stages: quick (alone), env tests kernels e2e-llama-a e2e-llama-b e2e-qwen-a e2e-qwen-b summary"
           return 2 ;;
    esac
}

stages=("$@")
if [ ${#stages[@]} -eq 0 ]; then
    stages=(env tests kernels e2e-llama-a e2e-llama-b e2e-qwen-a e2e-qwen-b summary)
fi
failed=0
for name in "${stages[@]}"; do
    stage "$name" || failed=1
done
exit $failed
