#!/usr/bin/env bash
# Every GPU check of the project in one device call (the device tool lends ~15 minutes a
# session): build, GPU tests, then the GPU benchmarks, each under its own time limit, logs
# and result JSON under $OUT. Run from the repository root:
#     bash benchmarks/gpu_session.sh            # every step; OUT defaults to gpu-out/
#     bash benchmarks/gpu_session.sh install tests label_features   # some steps (a device call
#     bash benchmarks/gpu_session.sh bench_stream bench_gpu bench_implicit   # is at most 600 s)
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
ONLY=" $* "
step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the log, print its tail
    local name=$1 limit=$2
    shift 2
    if [ "$ONLY" != "  " ] && [[ "$ONLY" != *" $name "* ]]; then return; fi
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: rc=$? in $((SECONDS - t0))s"
    tail -n 12 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.txt" 2>&1
step install 180 pip install --no-build-isolation --no-deps -e .
step tests 200 python -m pytest -q -x tests/test_triton_kernels.py tests/test_front.py
step label_features 45 python benchmarks/smoke_label_features.py --device cuda
step bench_stream 150 python benchmarks/bench_stream.py --n 2000000 --budget 1GB  # 8 GB host matrix
step bench_gpu 120 python benchmarks/bench_gpu.py
step bench_implicit 120 python benchmarks/bench_implicit.py --device cuda --iters 2 7
cp benchmarks/results/*.json "$OUT/" 2>/dev/null
