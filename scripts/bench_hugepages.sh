#!/usr/bin/env bash
# A/B of the huge-page weight storage (the default: large CPU weights in memory advised with
# MADV_HUGEPAGE) against ordinary 4 KiB pages (`--no-huge-pages`), same binary, interleaved
# rounds, so drift of a shared machine hits both sides alike. Needs a quiet machine.
#
#   bash scripts/bench_hugepages.sh [ROUNDS]        # default 5 rounds
#   MAMBA2_BIN=path/to/mamba2 SHAPE=370m DTYPE=f32 bash scripts/bench_hugepages.sh 3
#
# Prints one JSON line per run (mamba2 bench's, tagged with the side) and, at the end, the
# median decode and prefill tok/s of each side and their ratio. Also reports the system's THP
# mode: with `never`, the advice does nothing and both sides are the same.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds="${1:-5}"
shape="${SHAPE:-130m}"
dtype="${DTYPE:-bf16}"
prefill="${PREFILL:-16}"
decode="${DECODE:-256}"
bin="${MAMBA2_BIN:-target/release/mamba2}"
if [ -z "${MAMBA2_BIN:-}" ]; then
  cargo build --release -p mamba2-cli >&2
fi
echo "THP: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo n/a)" >&2
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')" >&2

out="$(mktemp)"
trap 'rm -f "$out"' EXIT
run() { # side, extra flags...
  local side="$1"
  shift
  "$bin" bench --device cpu --shape "$shape" --dtype "$dtype" --prefill "$prefill" \
    --decode "$decode" "$@" | sed "s/^{/{\"side\":\"$side\",/" | tee -a "$out"
}
for r in $(seq 1 "$rounds"); do
  # Alternate which side goes first, so neither always runs on a warmer machine.
  if [ $((r % 2)) = 1 ]; then
    run huge; run small --no-huge-pages
  else
    run small --no-huge-pages; run huge
  fi
done

python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = {}
for side in ("huge", "small"):
    r = [x for x in rows if x["side"] == side]
    med[side] = {k: statistics.median(x[k] for x in r) for k in ("decode_tok_s", "prefill_tok_s")}
    print(f"{side:5} pages: decode {med[side]['decode_tok_s']:.1f} tok/s, "
          f"prefill {med[side]['prefill_tok_s']:.1f} tok/s (median of {len(r)})")
for k in ("decode_tok_s", "prefill_tok_s"):
    print(f"huge / small {k}: {med['huge'][k] / med['small'][k]:.3f}x")
PY
