#!/usr/bin/env bash
# Runs the CUDA test binaries and model benchmarks on the device machine (see ../README.md and
# ../../../../shared/tools/CUDA.md): binaries carried as .carry/bins.tar.xz (bin/mamba2, the
# cuda_* test executables and bin/candle-transformers-mamba2-bench), logs to $OUT. Usage:
# device_run.sh MODE... with MODE tests|hybops|hybfix|hyb8b|moe|quant|quick|lin|ab5|ncufull|bench13|bench27|ab13|ab16|ncu|ncu16|b16ct13|ct16|all13|all27 (all*: every engine, one shape;
# HF needs .carry/pylib from fetch_mamba_ssm_triton.sh for mamba_ssm's Triton kernels)
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" .carry/x
[ -x .carry/x/bin/mamba2 ] || tar -C .carry/x -xJf .carry/bins.tar.xz
B=$PWD/.carry/x/bin
export LD_LIBRARY_PATH="$(python3 -c 'import nvidia,os;print(next(d for d in (os.path.join(p,"cu13","lib") for p in nvidia.__path__) if os.path.exists(os.path.join(d,"libcublas.so.13"))))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader > "$OUT/gpu.txt" 2>&1
bench() { # shape batch extra... (under $LAYOUT, an environment assignment list, if set;
           # $PREFILL prompt tokens, 2048 unless set)
    local shape=$1 batch=$2; shift 2
    env ${LAYOUT:-} $B/mamba2 bench --shape "$shape" --device cuda --dtype bf16 --prefill ${PREFILL:-2048} --decode 128 \
        --batch "$batch" --runs 3 --warmup 1 "$@" 2>&1 | tail -1 | tee -a "$OUT/bench.jsonl"
}
unit_tests() { # test executables, each with outputs NaN-poisoned, logs to $OUT
    for t in "$@"; do
        MAMBA2_CUDA_POISON=1 timeout 240 $B/$t --nocapture --test-threads=1 > "$OUT/$t.log" 2>&1
        echo "$t: exit $?"; tail -3 "$OUT/$t.log"
    done
}
decode_rate() { # "env assignments" shape batch decode-tokens: decode tok/s after a 64-token prompt
    env $1 $B/mamba2 bench --shape "$2" --device cuda --dtype bf16 --prefill 64 --decode "$4" \
        --batch "$3" --runs 3 --warmup 1 2>&1 | tail -1 | grep -o '"decode_tok_s":[0-9.]*' | cut -d: -f2
}
[ -n "${LAYOUT:-}" ] && echo "layout: $LAYOUT" | tee -a "$OUT/bench.jsonl"
for mode in "${@:-tests}"; do
echo "== $mode"
case $mode in
hybops)  # the kernels of the hybrid models' ops: attention, rotary, swiglu, relu_squared
    unit_tests cuda_hybrid_ops ;;
quick)  # the tests of the captured step's kernels only
    unit_tests cuda_linear_epilogue cuda_decode_step cuda_graph ;;
lin)  # the tests of the matrix-vector kernels and of the captured step
    unit_tests cuda_linear cuda_linear_epilogue cuda_graph ;;
ab5)  # batch 1 (default grid and one block per 4 rows) and batch 16 decode, both shapes
    for shape in 1.3b 2.7b; do
        for env in "" "MAMBA2_CUDA_MATVEC_RESIDENT=0"; do
            echo "$shape batch 1 ${env:-default}: decode $(decode_rate "$env" $shape 1 128) tok/s" | tee -a "$OUT/layouts.txt"
        done
        echo "$shape batch 16: decode $(decode_rate "" $shape 16 64) tok/s" | tee -a "$OUT/layouts.txt"
    done ;;
tests)
    unit_tests cuda_linear cuda_linear_epilogue cuda_decode_step cuda_graph cuda_hybrid_ops
    if [ -n "${LINEAR_BENCH:-}" ]; then
        timeout 120 $B/cuda_linear --ignored bench_linear_vs_cublas --nocapture > "$OUT/linear_bench.log" 2>&1
        grep "linear bf16" "$OUT/linear_bench.log"
    fi
    MAMBA2_CUDA_POISON=1 timeout 240 $B/cuda_parity --test-threads=8 > "$OUT/cuda_parity.log" 2>&1
    echo "cuda_parity: exit $?"; tail -3 "$OUT/cuda_parity.log"
    timeout 400 python3 kernels/cuda/bench/fixtures_cuda.py $B/mamba2 > "$OUT/fixtures.log" 2>&1
    echo "fixtures: exit $?"; tail -3 "$OUT/fixtures.log"
    ;;
bench13)
    bench 1.3b 1; bench 1.3b 1 --eager; bench 1.3b 4; bench 1.3b 16; bench 1.3b 16 --eager ;;
ab13)  # decode layouts of the captured step, 1.3b batch 1 (short prefill: decode is compared);
      # the fastest layout's environment goes to $OUT/best_env
    best=0; : > "$OUT/best_env"
    for env in "" "MAMBA2_CUDA_STEP_SPLIT=2" "MAMBA2_CUDA_NORM_EPILOGUES=0" "MAMBA2_CUDA_NORM_EPILOGUES=0 MAMBA2_CUDA_PDL=0"; do
        r=$(decode_rate "$env" 1.3b 1 128)
        echo "layout ${env:-default}: decode $r tok/s" | tee -a "$OUT/layouts.txt"
        if python3 -c "import sys; sys.exit(0 if float('${r:-0}') > $best else 1)"; then best=$r; echo "$env" > "$OUT/best_env"; fi
    done ;;
bench27)
    bench 2.7b 1; bench 2.7b 16 ;;
moe)  # the MoE ops' CUDA parity tests, then granite-4.0-h-tiny (MoE, 64 experts, top 6) decode
    unit_tests cuda_moe
    PREFILL=512 bench granite-4.0-h-tiny 1 ;;
quant)  # quantized ops on CUDA, the llama.cpp-made GGUF fixtures end to end, then 1.3b decode
       # at batch 1 in bf16, Q8_0 and Q4_K (short prompt: decode is compared)
    unit_tests cuda_quantized
    timeout 300 python3 kernels/cuda/bench/gguf_cuda.py $B/mamba2 > "$OUT/gguf_cuda.log" 2>&1
    echo "gguf_cuda: exit $?"; grep -v "^ok" "$OUT/gguf_cuda.log" | tail -8
    for q in "" q8_0 q4_k; do PREFILL=64 bench 1.3b 1 ${q:+--quantize $q}; done ;;
hybfix)  # the HF fixtures (Mamba-2 and hybrid) end to end, f32 and bf16
    timeout 400 python3 kernels/cuda/bench/fixtures_cuda.py $B/mamba2 f32 bf16 > "$OUT/fixtures.log" 2>&1
    echo "fixtures: exit $?"; grep -v "^ok" "$OUT/fixtures.log" | tail -12 ;;
hyb8b)  # nemotron-h-8b bf16 batch 1: ours, then HF (+ mamba_ssm Triton from .carry/pylib)
    bench nemotron-h-8b 1
    PYTHONPATH=.carry/pylib timeout 500 python3 kernels/cuda/bench/hf_hybrid.py --shape nemotron-h-8b \
        --prefill 2048 --decode 128 2>&1 | tail -3 | tee -a "$OUT/hf.txt" ;;
ncu|ncu16)  # per-kernel GPU time of captured decode layers (1.3b, bf16, batch 1 or 16)
    batch=1; [ "$mode" = ncu16 ] && batch=16
    filter="-k regex:linear_|mixer_decode|rms_norm_res"; [ $batch = 16 ] && filter=""  # cuBLAS: any name
    timeout 200 /usr/local/cuda/bin/ncu --clock-control none $filter \
        --launch-skip 80 --launch-count 12 --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
        $B/mamba2 bench --shape 1.3b --device cuda --dtype bf16 --prefill 8 --decode 6 --batch $batch --runs 1 --warmup 0 > "$OUT/$mode.txt" 2>&1
    grep -E "^  [a-zA-Z_]|gpu__time|dram__" "$OUT/$mode.txt" ;;
ncufull)  # stall reasons, occupancy and memory traffic of one captured layer (1.3b, bf16,
          # batch 1) and of the eager batch-16 layer (cuBLAS GEMMs included)
    secs="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats"
    timeout 200 /usr/local/cuda/bin/ncu --clock-control none -k regex:"linear_|mixer_decode" --launch-skip 60 --launch-count 3 $secs \
        $B/mamba2 bench --shape 1.3b --device cuda --dtype bf16 --prefill 8 --decode 4 --batch 1 --runs 1 --warmup 0 > "$OUT/ncufull.txt" 2>&1
    [ -n "${NCU_B1_ONLY:-}" ] || timeout 200 /usr/local/cuda/bin/ncu --clock-control none -k regex:"mixer_decode|nvjet|gemm|xmma|cutlass|rms_norm_res" --launch-skip 300 --launch-count 12 $secs \
        $B/mamba2 bench --shape 1.3b --device cuda --dtype bf16 --prefill 8 --decode 4 --batch 16 --runs 1 --warmup 0 --eager > "$OUT/ncufull16.txt" 2>&1
    grep -E "^  [a-zA-Z_]|Duration|DRAM Throughput|Issued Warp|Registers Per|Waves Per SM" "$OUT"/ncufull*.txt ;;
ab16)  # the step's n128 variant against the general one, 1.3b batch 16 decode
    for env in "" "MAMBA2_CUDA_STEP_N128=0"; do
        echo "batch 16 ${env:-default}: decode $(decode_rate "$env" 1.3b 16 64) tok/s" | tee -a "$OUT/layouts.txt"
    done ;;
ct16)  # candle-transformers batch 16 decode from an empty state (its batched prefill fails)
    for shape in 1.3b 2.7b; do
        timeout 100 $B/candle-transformers-mamba2-bench $shape bf16 0 32 1 16 16 > "$OUT/ct16_$shape.log" 2>&1
        tail -1 "$OUT/ct16_$shape.log" | tee -a "$OUT/bench.jsonl"; grep -m3 -iE "error|panick" "$OUT/ct16_$shape.log"
    done ;;
b16ct13)  # batch 16 of ours and of candle-transformers, 1.3b
    PREFILL=64 bench 1.3b 16
    timeout 100 $B/candle-transformers-mamba2-bench 1.3b bf16 16 16 1 16 16 > "$OUT/ct16_1.3b.log" 2>&1
    tail -1 "$OUT/ct16_1.3b.log" | tee -a "$OUT/bench.jsonl"; grep -m3 -iE "error|panick" "$OUT/ct16_1.3b.log" ;;
all13|all27)  # every engine at one shape, bf16, random weights, in this one call
    shape=1.3b; [ "$mode" = all27 ] && shape=2.7b
    bench $shape 1; PREFILL=64 bench $shape 16
    # candle-transformers: prefill 2048 needs > 141 GB at chunk 64 (run 13) and fails at chunk
    # 256 (32-bit launch sizes): its prefill is measured at 256 tokens, decode after it.
    timeout 150 $B/candle-transformers-mamba2-bench $shape bf16 256 32 1 64 2>&1 | tail -1 | tee -a "$OUT/bench.jsonl"
    timeout 100 $B/candle-transformers-mamba2-bench $shape bf16 16 16 1 16 16 > "$OUT/ct16_$shape.log" 2>&1
    tail -1 "$OUT/ct16_$shape.log" | tee -a "$OUT/bench.jsonl"; grep -m3 -iE "error|panick" "$OUT/ct16_$shape.log"
    export PYTHONPATH=$PWD/.carry/pylib${PYTHONPATH:+:$PYTHONPATH}
    timeout 200 python3 kernels/cuda/bench/hf_mamba2.py --shape $shape --prefill 2048 --decode 64 --batch 1 --runs 2 2>&1 | grep "^hf" | tee -a "$OUT/bench.jsonl"
    timeout 150 python3 kernels/cuda/bench/hf_mamba2.py --shape $shape --prefill 64 --decode 32 --batch 16 --runs 2 2>&1 | grep "^hf" | tee -a "$OUT/bench.jsonl"
    ;;
esac
done
