#!/usr/bin/env bash
# GGUF on the CPU, mamba2-rs vs llama.cpp on the SAME files (issue 17): the mamba2-130m shape with
# random weights (scripts/gguf_bench_ckpt.py), converted by llama.cpp's converter to f32 and
# quantized by llama-quantize to Q8_0 and Q4_K_M; prefill 512 and decode 128 tokens, 2 threads,
# ROUNDS interleaved rounds (ours, llama.cpp), medians. Run it on a quiet machine.
#   bash scripts/bench_gguf_cpu.sh [WORK_DIR] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/gguf-bench}; rounds=${2:-3}
eval "$(bash ../shared/tools/llama-cpp.sh)"
mkdir -p "$work"
[ -f "$work/m130/config.json" ] || python3 scripts/gguf_bench_ckpt.py "$work/m130"
[ -f "$work/m130-f32.gguf" ] || "$LLAMA_PY" ../shared/tools/llama-cpp/convert_gguf.py "$work/m130" \
    --outtype f32 --outfile "$work/m130-f32.gguf" --assume-pretokenizer gpt-2
for t in Q8_0 Q4_K_M; do
  [ -f "$work/m130-$t.gguf" ] || "$LLAMA_BIN/llama-quantize" "$work/m130-f32.gguf" "$work/m130-$t.gguf" "$t"
done
# MAMBA2_BIN: a mamba2 binary built elsewhere (else this checkout's release build).
if [ -z "${MAMBA2_BIN:-}" ]; then cargo build --release -p mamba2-cli; fi
M=${MAMBA2_BIN:-target/release/mamba2}
lscpu | grep 'Model name'
for t in Q8_0 Q4_K_M; do
  f="$work/m130-$t.gguf"
  for r in $(seq "$rounds"); do
    RAYON_NUM_THREADS=2 $M bench --model "$f" --device cpu --prefill 512 --decode 128 --runs 3 --warmup 1 \
      | tail -1 | python3 -c "import json,sys; d=json.load(sys.stdin); print('ours $t round $r prefill %.1f decode %.1f' % (d['prefill_tok_s'], d['decode_tok_s']))"
    "$LLAMA_BIN/llama-bench" -m "$f" -p 512 -n 128 -t 2 -r 3 -o json 2>/dev/null \
      | python3 -c "import json,sys; d=json.load(sys.stdin); print('llama $t round $r ' + ' '.join(('prefill' if x['n_prompt'] else 'decode') + ' %.1f' % x['avg_ts'] for x in d))"
  done
done
