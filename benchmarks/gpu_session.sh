#!/usr/bin/env bash
# Every GPU check of the project in two device calls of at most 8 minutes each (the device tool
# lends ~15 minutes a session): build, GPU tests, the GPU benchmarks and an ncu profile of the
# fused passes, each step under its own time limit. Run from the repository root:
#     bash benchmarks/gpu_session.sh part1      # build, GPU tests, bench_gpu.py               (<= 450 s)
#     bash benchmarks/gpu_session.sh part2      # build if the machine is fresh, bench_stream.py,
#                                               # bench_implicit.py, selflabel bench --device cuda,
#                                               # ncu on the fused passes, CLI smoke          (<= 470 s)
#     bash benchmarks/gpu_session.sh bench_gpu ncu_passes   # some steps by name
#     bash benchmarks/gpu_session.sh            # every step (about 15 minutes)
# Logs and result JSON go to $WORK (default gpu-work/). Where $OUT is set (the device tool), the
# script leaves there at most three files: summary.txt (each step's status and log tail), <name>.tgz
# (every log and JSON of the call) and nvidia-smi's gpu.txt. The first step to fail does not stop the
# others. Figures to commit: benchmarks/results/{gpu,stream,implicit}-*.json and bench-cuda.* from the tgz.
set -u
WORK=${WORK:-gpu-work}
mkdir -p "$WORK"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/$WORK/triton-cache}  # kernels compiled once per machine
export PYTHONUNBUFFERED=1
ARGS=" $* "
[ "$ARGS" = "  " ] && ARGS=" part1 part2 "
PART1=" install tests bench_gpu "  # the limits are first guesses: tune them from a run's summary
PART2=" install_if_needed bench_stream bench_implicit selflabel_bench ncu_passes label_features "
WANT=""
for a in $ARGS; do
    case $a in
        part1) WANT="$WANT$PART1" ;;
        part2) WANT="$WANT$PART2" ;;
        *) WANT="$WANT $a " ;;
    esac
done
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
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv \
    >"$WORK/gpu.txt" 2>&1
step install 140 pip install --no-build-isolation --no-deps -e .
step install_if_needed 120 bash -c 'python -c "import selflabel._C" 2>/dev/null && echo built already ||
    pip install --no-build-isolation --no-deps -e .'
step tests 200 python -m pytest -q -x tests/test_triton_kernels.py tests/test_front.py
step bench_gpu 110 python benchmarks/bench_gpu.py
step bench_stream 100 python benchmarks/bench_stream.py --n 2000000 --budget 1GB  # 8 GB host matrix
step bench_implicit 70 python benchmarks/bench_implicit.py --device cuda --iters 2 7
step selflabel_bench 70 python -m selflabel bench --device cuda --sizes 100000x1000 1280000x3000 \
    --out "$WORK/bench-cuda.json"
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
step ncu_passes 70 ncu --nvtx --nvtx-include "scaling/" --nvtx-include "log/" --kernel-name "regex:_(scaling|log)_" \
    --clock-control none --csv --metrics \
    gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sector_hit_rate.pct,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active \
    python -c "$NCU_PY"
step label_features 40 python benchmarks/smoke_label_features.py --device cuda
cp benchmarks/results/*.json "$WORK/" 2>/dev/null
if [ -n "${OUT:-}" ]; then
    tag=$(echo $ARGS | tr ' ' '-')
    tar czf "$OUT/gpu-session-$tag.tgz" --exclude=triton-cache -C "$WORK" .
    cp "$SUMMARY" "$WORK/gpu.txt" "$OUT/"
fi
