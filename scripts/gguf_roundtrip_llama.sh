#!/usr/bin/env bash
# gguf_roundtrip_llama.sh — does llama.cpp read OUR GGUF files as it reads its own? (issue 17, part 3; not CI)
#
#   bash scripts/gguf_roundtrip_llama.sh                 # f32, q8_0, q4_k
#   TYPES="f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k" bash scripts/gguf_roundtrip_llama.sh
#
# For the bundled model (models/mamba2-tiny, or MODEL=folder) and each type T:
#   ours:  `mamba2 quantize MODEL ours-T.gguf --type T`
#   llama: llama.cpp's converter on the same checkpoint (--outtype f32/f16/bf16), then for the block types
#          `llama-quantize --pure ref-f32.gguf ref-T.gguf T'` (T' = Q8_0, Q4_0, ..., Q3_K_S, Q4_K_S, Q5_K_S, Q6_K:
#          --pure puts every matrix in T', as `mamba2 quantize` does; the _S mixes are the ones whose default type
#          is the K type, and their general.file_type is the one we write)
# and reports, per type:
#   - metadata: keys and values that differ (key order is not compared: llama-quantize re-orders keys)
#   - tensors: how many are byte-identical (same name, type, shape and bytes), which differ and by how many bytes
#   - logits: llama.cpp's `dump_logits` on both files with the same ids (one batch, and prefill P + one token at a
#     time), max |ours - llama's|; and this engine (`mamba2 logits`) on our file vs llama.cpp on our file.
# The bundled tokenizer is not one llama.cpp's converter recognises by hash: like scripts/gguf_fixtures.py, the
# converter runs with --assume-pretokenizer gpt-2 on a copy of the folder with a tokenizer_config.json (without it
# transformers picks GPTNeoXTokenizer for model_type mamba2 and the converter's vocab-size assertion fails).
#
# Output: a table on stdout, everything under $WORK (default target/gguf_roundtrip). Needs the llama.cpp tools of
# ../shared/tools/llama-cpp.sh (built once, ~15 min on 2 cores) and a build of the mamba2 binary (MAMBA2=path to use
# an existing one; default: `cargo build --release -p mamba2-cli`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${TOOLS:-$ROOT/../shared/tools}
[ -f "$TOOLS/llama-cpp.sh" ] || TOOLS=/work/shared/tools
eval "$(bash "$TOOLS/llama-cpp.sh")"
MODEL=${MODEL:-$ROOT/models/mamba2-tiny}
WORK=${WORK:-$ROOT/target/gguf_roundtrip}
TYPES=${TYPES:-"f32 q8_0 q4_k"}
TEXT=${TEXT:-"It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife."}
if [ -z "${MAMBA2:-}" ]; then
  (cd "$ROOT" && cargo build -q --release -p mamba2-cli)
  MAMBA2=$ROOT/target/release/mamba2
fi
NAME=$(basename "$MODEL")
mkdir -p "$WORK"
rm -rf "$WORK/hf"
cp -r "$MODEL" "$WORK/hf"
if [ ! -f "$WORK/hf/tokenizer_config.json" ]; then
  cat > "$WORK/hf/tokenizer_config.json" <<'EOF'
{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
 "pad_token": "<|endoftext|>", "add_bos_token": false, "add_eos_token": false}
EOF
fi
log() { echo "gguf_roundtrip: $*" >&2; }

convert() {  # outtype outfile
  [ -f "$2" ] && [ "$2" -nt "$MODEL/model.safetensors" ] && return 0
  log "llama.cpp converter --outtype $1"
  "$LLAMA_PY" "$TOOLS/llama-cpp/convert_gguf.py" "$WORK/hf" --outtype "$1" --outfile "$2" \
    --assume-pretokenizer gpt-2 --model-name "$NAME" > "$WORK/convert-$1.log" 2>&1
}
llama_type() {
  case $1 in
    q3_k) echo Q3_K_S ;; q4_k) echo Q4_K_S ;; q5_k) echo Q5_K_S ;;
    *) echo "$1" | tr a-z A-Z ;;
  esac
}

IDS=$("$MAMBA2" tokenize --model "$MODEL" --prompt "$TEXT")
log "ids: $IDS"
convert f32 "$WORK/ref-f32.gguf"
cat > "$WORK/compare.py" <<'EOF'
# compare.py OURS.gguf REF.gguf IDS_JSON WORK MAMBA2: metadata, tensor bytes, llama.cpp logits, our logits
import json, os, subprocess, sys
sys.path.insert(0, os.path.join(os.environ["LLAMA_SRC"], "gguf-py"))
import gguf, numpy as np, safetensors.numpy
ours, ref, ids, work, mamba2 = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
def meta(r):
    return {k: ([gguf.GGUFValueType(t).name for t in f.types], f.contents())
            for k, f in r.fields.items() if not k.startswith("GGUF.")}
ma, mb = meta(a), meta(b)
meta_diff = [k for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]
for k in meta_diff:
    print(f"  metadata {k}: ours {str(ma.get(k))[:70]} / llama.cpp {str(mb.get(k))[:70]}", file=sys.stderr)
ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
same, differ, types = 0, [], {}
for n in sorted(set(ta) | set(tb)):
    x, y = ta.get(n), tb.get(n)
    if x is None or y is None:
        differ.append(f"{n} only in {'llama.cpp' if x is None else 'ours'}"); continue
    types[x.tensor_type.name] = types.get(x.tensor_type.name, 0) + 1
    if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
        differ.append(f"{n} {x.tensor_type.name}{list(x.shape)} vs {y.tensor_type.name}{list(y.shape)}"); continue
    bx, by = x.data.tobytes(), y.data.tobytes()
    if bx == by:
        same += 1
    else:
        nb = int(np.count_nonzero(np.frombuffer(bx, np.uint8) != np.frombuffer(by, np.uint8)))
        differ.append(f"{n} {x.tensor_type.name}: {nb}/{len(bx)} bytes")
for d in differ:
    print(f"  tensor {d}", file=sys.stderr)
def llama_logits(path, step=None):
    out = os.path.join(work, "logits.f32")
    cmd = [os.path.join(os.environ["LLAMA_BIN"], "dump_logits"), path, out]
    if step is not None:
        cmd += ["--step", str(step)]
    n, nv = map(int, subprocess.run(cmd + [str(i) for i in ids], check=True, capture_output=True, text=True).stdout.split()[-2:])
    return np.fromfile(out, dtype=np.float32).reshape(n, nv)
P = len(ids) // 2
la, lb = llama_logits(ours), llama_logits(ref)
sa, sb = llama_logits(ours, P), llama_logits(ref, P)
inp = os.path.join(work, "ids.safetensors")
safetensors.numpy.save_file({"input_ids": np.array([ids], dtype=np.int64)}, inp)
outp = os.path.join(work, "ours_logits.safetensors")
subprocess.run([mamba2, "logits", "--model", ours, "--device", "cpu", "--input", inp, "--out", outp,
                "--prefill-len", str(P)], check=True, capture_output=True)
me = safetensors.numpy.load_file(outp)
print(json.dumps({
    "metadata_differs": meta_diff,
    "tensors_identical": same, "tensors_total": len(set(ta) | set(tb)), "types": types,
    "llama_ours_vs_llama_ref_oneshot": float(np.abs(la - lb).max()),
    "llama_ours_vs_llama_ref_step": float(np.abs(sa - sb).max()),
    "engine_ours_vs_llama_ours_prefill": float(np.abs(me["logits_prefill"][0] - la).max()),
    "engine_ours_vs_llama_ours_decode": float(np.abs(me["logits_decode"][0] - sa).max()),
    "logit_abs_max": float(np.abs(lb).max()),
}))
EOF

printf '%-5s %-7s %-22s %-14s %-14s %-14s %-14s %s\n' type llama tensors_identical llama:ours-ref llama:step engine-llama engine:decode metadata_diffs
for T in $TYPES; do
  OURS=$WORK/ours-$T.gguf
  "$MAMBA2" quantize "$MODEL" "$OURS" --type "$T" 2> "$WORK/quantize-$T.log"
  case $T in
    f32|f16|bf16) LT=$(echo "$T" | tr a-z A-Z); REF=$WORK/ref-$T.gguf; convert "$T" "$REF" ;;
    *) LT=$(llama_type "$T"); REF=$WORK/ref-$LT.gguf
       "$LLAMA_BIN/llama-quantize" --pure "$WORK/ref-f32.gguf" "$REF" "$LT" 2 > "$WORK/llama-quantize-$LT.log" 2>&1 ;;
  esac
  R=$("$LLAMA_PY" "$WORK/compare.py" "$OURS" "$REF" "$IDS" "$WORK" "$MAMBA2" 2> "$WORK/compare-$T.log")
  echo "$R" > "$WORK/result-$T.json"
  "$LLAMA_PY" - "$T" "$LT" "$R" <<'EOF'
import json, sys
t, lt, r = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
print(f"{t:<5} {lt:<7} {str(r['tensors_identical']) + '/' + str(r['tensors_total']):<22} "
      f"{r['llama_ours_vs_llama_ref_oneshot']:<14.3g} {r['llama_ours_vs_llama_ref_step']:<14.3g} "
      f"{r['engine_ours_vs_llama_ours_prefill']:<14.3g} {r['engine_ours_vs_llama_ours_decode']:<14.3g} "
      f"{','.join(r['metadata_differs']) or '-'}")
EOF
done
log "details: $WORK/compare-*.log, $WORK/result-*.json (max |logit| of the reference in logit_abs_max)"
