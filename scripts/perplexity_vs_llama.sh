#!/usr/bin/env bash
# perplexity_vs_llama.sh — `mamba2 perplexity` against llama.cpp's `llama-perplexity` on the same GGUF
# files and text (issue 17, part 5). Not run in CI: it needs llama.cpp's tools (built by
# /work/shared/tools/llama-cpp.sh) and takes a few minutes on 2 cores.
#
#   bash scripts/perplexity_vs_llama.sh            # bundled model, its validation text, -c 512, 2 threads
#   CTX=256 CHUNKS=20 bash scripts/perplexity_vs_llama.sh
#
# Steps:
#  1. the bundled model (models/mamba2-tiny) to GGUF f32 with llama.cpp's own converter, then
#     llama-quantize to Q8_0 and Q4_K_M. The converter's AutoTokenizer needs a tokenizer_config.json
#     naming PreTrainedTokenizerFast (else it builds GPTNeoXTokenizer, which adds <|padding|> as id 4096
#     and fails its `max(vocab) < vocab_size` assertion) — the same fix as scripts/gguf_fixtures.py; the
#     model folder is linked into $WORK with that file added, models/ is not touched.
#  2. llama-perplexity -m F.gguf -f TEXT -c CTX -t THREADS, and
#     mamba2 perplexity --model F.gguf --file TEXT --ctx CTX --device cpu (release build) on each file;
#     then mamba2 on the safetensors checkpoint: f32, --dtype bf16, --quantize q8_0, --quantize q4_k.
#  3. a table: final PPL (+/- error) of both, the difference in %, the largest difference of the
#     per-chunk running estimates ([k]x.xxxx), the text's token count by each tool, and wall times.
# Outputs in $WORK (default /tmp/perplexity_vs_llama): the GGUFs, logs, results.jsonl, table.md.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
WORK=${WORK:-/tmp/perplexity_vs_llama}
TEXT=${TEXT:-$ROOT/models/mamba2-tiny/validation.txt}
MODEL_DIR=${MODEL_DIR:-$ROOT/models/mamba2-tiny}
CTX=${CTX:-512}
THREADS=${THREADS:-2}
CHUNKS=${CHUNKS:-}  # empty: every chunk
SHARED_TOOLS=${SHARED_TOOLS:-/work/shared/tools}
eval "$(bash "$SHARED_TOOLS/llama-cpp.sh")"
log() { echo "perplexity_vs_llama: $*" >&2; }

cargo build --release -p mamba2-cli >&2
MAMBA2=$ROOT/target/release/mamba2
mkdir -p "$WORK/hf"
: > "$WORK/results.jsonl"

# 1. GGUF files
for f in config.json model.safetensors tokenizer.json; do ln -sf "$MODEL_DIR/$f" "$WORK/hf/$f"; done
cat > "$WORK/hf/tokenizer_config.json" <<'EOF'
{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
 "pad_token": "<|endoftext|>", "add_bos_token": false, "add_eos_token": false}
EOF
F32=$WORK/tiny-f32.gguf
log "converting $MODEL_DIR to $F32"
"$LLAMA_PY" "$SHARED_TOOLS/llama-cpp/convert_gguf.py" "$WORK/hf" --outtype f32 --outfile "$F32" \
  --assume-pretokenizer gpt-2 > "$WORK/convert.log" 2>&1
for q in Q8_0 Q4_K_M; do
  "$LLAMA_BIN/llama-quantize" "$F32" "$WORK/tiny-${q,,}.gguf" "$q" > "$WORK/quantize-$q.log" 2>&1
done

chunk_args=()
[ -n "$CHUNKS" ] && chunk_args=(--chunks "$CHUNKS")
now() { date +%s.%N; }

# llama.cpp's token count for the text: a context larger than half the text (here: its size in bytes) makes
# llama-perplexity stop after tokenizing with "the data file you provided tokenizes to only N tokens".
LLAMA_TOKENS=$("$LLAMA_BIN/llama-perplexity" -m "$F32" -f "$TEXT" -c $(($(wc -c < "$TEXT") + 2)) -t "$THREADS" 2>&1 \
  | sed -n 's/.*tokenizes to only \([0-9]*\) tokens.*/\1/p' || true)

# 2. runs. ours NAME MODEL ARGS... / llama NAME GGUF
ours() {
  local name=$1 model=$2; shift 2
  log "mamba2 perplexity: $name"
  local t0; t0=$(now)
  "$MAMBA2" perplexity --model "$model" --file "$TEXT" --ctx "$CTX" --device cpu "${chunk_args[@]}" "$@" \
    > "$WORK/ours-$name.out" 2> "$WORK/ours-$name.err"
  echo "{\"tool\":\"mamba2\",\"name\":\"$name\",\"wall_s\":$(awk "BEGIN{print $(now) - $t0}"),\"json\":$(tail -n1 "$WORK/ours-$name.out")}" \
    >> "$WORK/results.jsonl"
}
llama() {
  local name=$1 gguf=$2
  log "llama-perplexity: $name"
  local t0 try
  # llama.cpp's logger is an intentionally leaked singleton with a writer thread: at exit its last lines
  # (the final estimate among them) are sometimes lost (llama.cpp issue 22142; seen here 2 runs in 5).
  # Run again, up to 3 times, until the final estimate is in the log; wall_s is the last try's.
  for try in 1 2 3; do
    t0=$(now)
    "$LLAMA_BIN/llama-perplexity" -m "$gguf" -f "$TEXT" -c "$CTX" -t "$THREADS" "${chunk_args[@]}" \
      > "$WORK/llama-$name.log" 2>&1
    grep -q "Final estimate" "$WORK/llama-$name.log" && break
    log "llama-perplexity: $name: no final estimate in the log (try $try)"
  done
  echo "{\"tool\":\"llama.cpp\",\"name\":\"$name\",\"wall_s\":$(awk "BEGIN{print $(now) - $t0}"),\"tokens\":${LLAMA_TOKENS:-null}}" \
    >> "$WORK/results.jsonl"
}
for g in f32 q8_0 q4_k_m; do
  llama "gguf-$g" "$WORK/tiny-$g.gguf"
  ours "gguf-$g" "$WORK/tiny-$g.gguf"
done
ours st-f32 "$MODEL_DIR"
ours st-bf16 "$MODEL_DIR" --dtype bf16
ours st-q8_0 "$MODEL_DIR" --quantize q8_0
ours st-q4_k "$MODEL_DIR" --quantize q4_k
ours st-q8_0-bf16 "$MODEL_DIR" --quantize q8_0 --dtype bf16
ours st-q4_k-bf16 "$MODEL_DIR" --quantize q4_k --dtype bf16

# 3. table
python3 - "$WORK" <<'EOF'
import json, re, sys
from pathlib import Path
work = Path(sys.argv[1])
rows = [json.loads(l) for l in (work / "results.jsonl").read_text().splitlines()]
def running(text):
    return [float(x) for x in re.findall(r"\[\d+\](\d+\.\d+),", text)]
def final(text):
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    return (float(m.group(1)), float(m.group(2))) if m else (None, None)
by = {(r["tool"], r["name"]): r for r in rows}
out = ["| file | mamba2 PPL | llama-perplexity PPL | difference | max per-chunk running diff | chunks | tokens (ours / llama.cpp) | wall s (ours / llama.cpp) |",
       "| --- | --- | --- | --- | --- | --- | --- | --- |"]
for g in ["f32", "q8_0", "q4_k_m"]:
    name = f"gguf-{g}"
    o, l = by[("mamba2", name)], by[("llama.cpp", name)]
    oj = o["json"]
    ltext = (work / f"llama-{name}.log").read_text()
    lp, le = final(ltext)
    orun, lrun = running((work / f"ours-{name}.err").read_text()), running(ltext)
    n = min(len(orun), len(lrun))
    dmax = max(abs(a - b) for a, b in zip(orun[:n], lrun[:n])) if n else float("nan")
    diff = "n/a" if lp is None else f"{100 * (lp - oj['ppl']) / oj['ppl']:+.4f} %"
    lcol = "failed (see log)" if lp is None else f"{lp:.4f} ± {le:.4f}"
    out.append(f"| tiny-{g}.gguf | {oj['ppl']:.4f} ± {oj['ppl_stderr']:.4f} | {lcol} | {diff} | {dmax:.4f} ({n} vs {len(lrun)} chunks) "
               f"| {oj['chunks']} | {oj['text_tokens']} / {l['tokens']} | {o['wall_s']:.1f} / {l['wall_s']:.1f} |")
out += ["", "| safetensors run | mamba2 PPL | vs bf16 | quantization | dtype | wall s |", "| --- | --- | --- | --- | --- | --- |"]
base = by[("mamba2", "st-bf16")]["json"]["ppl"]
for name in ["st-bf16", "st-f32", "st-q8_0", "st-q4_k", "st-q8_0-bf16", "st-q4_k-bf16"]:
    r = by[("mamba2", name)]; j = r["json"]
    out.append(f"| {name} | {j['ppl']:.4f} ± {j['ppl_stderr']:.4f} | {100 * (j['ppl'] - base) / base:+.3f} % "
               f"| {j['quantization']} | {j['dtype']} | {r['wall_s']:.1f} |")
(work / "table.md").write_text("\n".join(out) + "\n")
print("\n".join(out))
EOF
