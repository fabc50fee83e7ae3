#!/usr/bin/env bash
# Every GPU check of the project in one device call of at most 9.5 minutes (the device tool lends
# ~15 minutes a session): build, GPU tests, the GPU benchmarks, smoke runs of the CLI on CUDA and an
# ncu profile of the fused passes, each step under its own time limit, most important first.
# Run from the repository root:
#     bash benchmarks/gpu_session.sh                         # every step, in order (<= 570 s)
#     bash benchmarks/gpu_session.sh bench_gpu ncu_passes    # some steps by name
# PY names the interpreter (default python3, the one that holds torch on the GPU machines).
# Logs and result JSON go to $WORK (default gpu-work/). Where $OUT is set (the device tool), the
# script refreshes there after every step (so a call cut short still returns what ran): summary.txt
# (each step's status and log tail), gpu-session.tgz (every log and JSON) and nvidia-smi's gpu.txt.
# The first step to fail does not stop the others. Figures to commit: the JSON files from the tgz.
set -u
WORK=${WORK:-gpu-work}
mkdir -p "$WORK"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/$WORK/triton-cache}  # kernels compiled once per machine
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
ALL=" install tests bench_gpu selflabel_bench dropins bench_implicit train_smoke label_features ncu_passes bench_stream "
WANT=" $* "
[ "$WANT" = "  " ] && WANT=$ALL
SUMMARY="$WORK/summary.txt"
: >"$SUMMARY"
step() {  # step NAME SECONDS COMMAND...: run with a limit, keep the log, note its status and tail
    local name=$1 limit=$2
    shift 2
    if [[ "$WANT" != *" $name "* ]]; then return; fi
    local t0=$SECONDS
    timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
    local rc=$?
    { echo "== $name: rc=$rc in $((SECONDS - t0))s (limit ${limit}s)"; tail -n 15 "$WORK/$name.log"; } | tee -a "$SUMMARY"
    if [ -n "${OUT:-}" ]; then  # refresh what comes back after every step
        # the results this session wrote (gpu.txt is written before the first step), not the committed ones
        find benchmarks/results -name '*.json' -newer "$WORK/gpu.txt" -exec cp {} "$WORK/" \;
        tar czf "$OUT/gpu-session.tgz" --exclude=triton-cache -C "$WORK" .
        cp "$SUMMARY" "$WORK/gpu.txt" "$OUT/"
    fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv \
    >"$WORK/gpu.txt" 2>&1
step install 150 bash -c "$PY -c 'import selflabel._C' 2>/dev/null && echo built already ||
    $PY -m pip install --no-build-isolation --no-deps -e ."
# the kernels against their torch references at real sizes, and the solver on backend="triton";
# 16 processes so the autotuner's compilations run side by side (about 205 s on an H200)
step tests 250 $PY -m pytest -q -n 16 -rfE --tb=short -W ignore tests/test_triton_kernels.py \
    tests/test_front.py tests/test_compat.py
step bench_gpu 100 $PY benchmarks/bench_gpu.py
step selflabel_bench 90 $PY -m selflabel bench --device cuda --sizes 100000x1000 1280000x3000 \
    --out "$WORK/bench-cuda.json"
step dropins 50 $PY benchmarks/bench_dropins.py --device cuda
# whole solves at each float32 product precision (0.19, 0.44 and 1.1 s per iteration on an H200)
step bench_implicit 120 bash -c "for p in medium high highest; do
    $PY benchmarks/bench_implicit.py --device cuda --d 128 --iters 2 5 --precision \$p --no-save; done"
step train_smoke 60 $PY -m selflabel train --device cuda --data digits --epochs 3 --out "$WORK/train"
step label_features 40 $PY benchmarks/smoke_label_features.py --device cuda
# ncu on one scaling and one log-domain pass at 1.28M x 3000 float32 (after autotuning, which runs
# outside the profiled NVTX range): achieved DRAM bytes and bandwidth, L2 hit rate, duration.
NCU_PY='
import torch
from selflabel.kernels import logdomain, scaling
n, k = 1_280_000, 3000
M = torch.rand(1, n, k, device="cuda") + 0.01
a = torch.full((n,), 1.0 / n, device="cuda")
u, v = torch.ones(1, n, device="cuda"), torch.ones(1, k, device="cuda")
f, g = torch.zeros(1, n, device="cuda"), torch.zeros(1, k, device="cuda")
for name, run in [("scaling", lambda: scaling.scaling_pass(M, a, u, v)),
                  ("log", lambda: logdomain.log_pass(M, torch.log(a), f, g))]:
    run()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(name)
    run()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
print("matrix bytes", M.numel() * M.element_size())
'
step ncu_passes 60 ncu --nvtx --nvtx-include "scaling/" --nvtx-include "log/" --kernel-name "regex:_(scaling|log)_" \
    --clock-control none --csv --metrics \
    gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sector_hit_rate.pct,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active \
    $PY -c "$NCU_PY"
step bench_stream 60 $PY benchmarks/bench_stream.py --n 2000000 --budget 1GB  # 8 GB host matrix
