#!/usr/bin/env bash
# Runs the CUDA test binaries and model benchmarks on the device machine (see ../README.md and
# ../../../../shared/tools/CUDA.md): binaries carried as .carry/bins.tar.xz (bin/mamba2 and the
# cuda_* test executables), logs to $OUT. Usage: device_run.sh tests|bench13|bench27
set -u
mode=${1:-tests}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" .carry/x
[ -x .carry/x/bin/mamba2 ] || tar -C .carry/x -xJf .carry/bins.tar.xz
B=$PWD/.carry/x/bin
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia,os;print(next(d for d in (os.path.join(p,"cu13","lib") for p in nvidia.__path__) if os.path.exists(os.path.join(d,"libcublas.so.13"))))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/gpu.txt" 2>&1
bench() { # shape batch extra... (under $LAYOUT, an environment assignment list, if set)
    local shape=$1 batch=$2; shift 2
    env ${LAYOUT:-} $B/mamba2 bench --shape "$shape" --device cuda --dtype bf16 --prefill 2048 --decode 128 \
        --batch "$batch" --runs 3 --warmup 1 "$@" 2>&1 | tail -1 | tee -a "$OUT/bench.jsonl"
}
[ -n "${LAYOUT:-}" ] && echo "layout: $LAYOUT" | tee -a "$OUT/bench.jsonl"
case $mode in
tests)
    for t in cuda_linear cuda_decode_step cuda_graph; do
        MAMBA2_CUDA_POISON=1 timeout 240 $B/$t --nocapture --test-threads=1 > "$OUT/$t.log" 2>&1
        echo "$t: exit $?"; tail -3 "$OUT/$t.log"
    done
    timeout 120 $B/cuda_linear --ignored bench_linear_vs_cublas --nocapture > "$OUT/linear_bench.log" 2>&1
    grep "linear bf16" "$OUT/linear_bench.log"
    MAMBA2_CUDA_POISON=1 timeout 240 $B/cuda_parity --test-threads=8 > "$OUT/cuda_parity.log" 2>&1
    echo "cuda_parity: exit $?"; tail -3 "$OUT/cuda_parity.log"
    timeout 200 python3 kernels/cuda/bench/fixtures_cuda.py $B/mamba2 > "$OUT/fixtures.log" 2>&1
    echo "fixtures: exit $?"; tail -3 "$OUT/fixtures.log"
    ;;
bench13)
    bench 1.3b 1; bench 1.3b 1 --eager; bench 1.3b 4; bench 1.3b 16; bench 1.3b 16 --eager ;;
ab13)  # decode layouts of the captured step, 1.3b batch 1 (short prefill: decode is compared);
      # the fastest layout's environment goes to $OUT/best_env
    best=0; : > "$OUT/best_env"
    for env in "" "MAMBA2_CUDA_FUSED_NORMS=res" "MAMBA2_CUDA_FUSED_NORMS=0" "MAMBA2_CUDA_FUSED_NORMS=0 MAMBA2_CUDA_PDL=0"; do
        r=$(env $env $B/mamba2 bench --shape 1.3b --device cuda --dtype bf16 --prefill 64 --decode 128 \
            --batch 1 --runs 3 --warmup 1 2>&1 | tail -1 | grep -o '"decode_tok_s":[0-9.]*' | cut -d: -f2)
        echo "layout ${env:-default}: decode $r tok/s" | tee -a "$OUT/layouts.txt"
        if python3 -c "import sys; sys.exit(0 if float('${r:-0}') > $best else 1)"; then best=$r; echo "$env" > "$OUT/best_env"; fi
    done ;;
bench27)
    bench 2.7b 1; bench 2.7b 16 ;;
ncu)  # per-kernel GPU time of two captured decode layers (1.3b, bf16, batch 1)
    timeout 200 /usr/local/cuda/bin/ncu --clock-control none -k regex:'linear_|mixer_decode|rms_norm_res' \
        --launch-skip 60 --launch-count 9 --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
        $B/mamba2 bench --shape 1.3b --device cuda --dtype bf16 --prefill 8 --decode 6 --runs 1 --warmup 0 > "$OUT/ncu.txt" 2>&1
    grep -E "^  [a-z]|gpu__time|dram__" "$OUT/ncu.txt" ;;
esac
