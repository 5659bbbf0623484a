#!/usr/bin/env bash
# Verifies the Metal path on a real Apple GPU: what CI can only emulate (see README, "Metal").
# Needs macOS on Apple silicon (or another Metal GPU), Xcode's command-line tools
# (`xcode-select --install`) and a Rust toolchain. From the repository root:
#
#   bash scripts/verify-metal.sh            # everything below, logs and results in target/verify-metal/
#   bash scripts/verify-metal.sh tests      # one or more steps: tests fixtures golden bench
#   bash scripts/verify-metal.sh --dry-run  # print the commands instead (any OS; tested in CI)
#
# Steps:
#   tests     the Metal parity tests: every `metal_device*` test target (ops on the GPU vs the
#             reference on the CPU), `cargo test --release --features metal ... -- --ignored`
#   fixtures  the committed HF fixtures through the whole model, `mamba2 logits --device metal`,
#             f32/bf16/f16, prefill and prefill-then-step, at the CPU tests' tolerances
#   golden    the bundled model's golden greedy tokens (tests/golden) on the GPU
#   bench     `mamba2 bench --device metal` at the 130m, 370m and 1.3b shapes in f16 and bf16,
#             then a table beside llama.cpp's Metal figures (published ones: none found; set
#             LLAMA_BENCH=/path/to/llama-bench and LLAMA_GGUF_130M_F16=/path/to.gguf, ... to
#             measure llama.cpp on this Mac; keys LLAMA_GGUF_<130M|370M|1_3B>_<F16|BF16>)
#
# Exit status: 0 when every step passed, 1 when one failed, 2 when this machine cannot run it.
# Environment: VERIFY_METAL_OUT (results folder), BENCH_PREFILL / BENCH_DECODE (512 / 128).
set -uo pipefail

die() { # status message...
  local status=$1; shift
  printf 'verify-metal.sh: %s\n' "$*" >&2
  exit "$status"
}

dry=0
if [ "${1:-}" = --dry-run ]; then
  dry=1
  shift
fi
x() { # command...: runs it, or prints it in a dry run
  if [ $dry = 1 ]; then printf '+ %s\n' "$*"; else "$@"; fi
}

# ---------------------------------------------------------------------------- the machine
os=$(uname -s)
if [ $dry = 1 ]; then
  echo "verify-metal.sh: dry run on $os: the commands a Mac would run"
elif [ "$os" != Darwin ]; then
  die 2 "needs macOS with a Metal GPU; this is $os. Nothing here ran: on Linux the Metal path is only emulated (cargo test runs the .metal sources through crates/msl-harness; see README, \"Metal\")."
fi
if [ $dry = 0 ]; then
  xcode-select -p >/dev/null 2>&1 ||
    die 2 "needs Xcode's command-line tools (run: xcode-select --install)"
  command -v cargo >/dev/null 2>&1 || die 2 "needs a Rust toolchain (https://rustup.rs)"
  command -v python3 >/dev/null 2>&1 || die 2 "needs python3 (it comes with Xcode's command-line tools)"
  # system_profiler names the GPU and its Metal support; a Mac without Metal stops here
  gpu=$(system_profiler SPDisplaysDataType 2>/dev/null | awk -F': ' '/Chipset Model|Metal/ {print $2}' | paste -sd ' ' -)
  [ -n "$gpu" ] || die 2 "system_profiler reports no GPU"
fi

cd "$(dirname "$0")/.." || die 2 "cannot enter the repository root"
out=${VERIFY_METAL_OUT:-target/verify-metal}
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(tests fixtures golden bench)
for s in "${steps[@]}"; do
  case $s in tests | fixtures | golden | bench) ;; *) die 2 "unknown step '$s' (tests fixtures golden bench)" ;; esac
done

if [ $dry = 0 ]; then
  mkdir -p "$out"
  {
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "macOS: $(sw_vers -productVersion) ($(uname -m))"
    echo "GPU: $gpu"
  } | tee "$out/machine.txt"
fi

failed=()
step() { # name command...: runs, logs to $out/name.log, records failure
  local name=$1; shift
  echo "== $name"
  if [ $dry = 1 ]; then
    "$@"
    return
  fi
  if "$@" 2>&1 | tee "$out/$name.log"; then
    echo "-- $name: ok"
  else
    echo "-- $name: FAILED (log: $out/$name.log)"
    failed+=("$name")
  fi
}

# ---------------------------------------------------------------------------- steps
parity_tests() {
  local args=() f pkg name
  # every metal_device* target of every package (ignored without a device, run here)
  for f in crates/*/tests/metal_device*.rs tests/metal_device*.rs; do
    [ -e "$f" ] || continue
    name=$(basename "$f" .rs)
    case $f in
      crates/*) pkg=$(basename "$(dirname "$(dirname "$f")")") ;;
      *) pkg="mamba2-rs" ;;
    esac
    args+=(-p "$pkg" --test "$name")
  done
  [ ${#args[@]} -gt 0 ] || { echo "no metal_device* test targets found"; return 1; }
  x cargo test --release --features metal "${args[@]}" -- --ignored --test-threads=1
}

mamba2=target/release/mamba2
build_cli() {
  x cargo build --release --features metal -p mamba2-cli
}

bench_all() {
  local shape dtype key gguf
  if [ $dry = 0 ]; then
    : >"$out/bench.jsonl"
    : >"$out/llama.jsonl"
  fi
  for shape in 130m 370m 1.3b; do
    for dtype in f16 bf16; do
      if [ $dry = 1 ]; then
        x "$mamba2" bench --shape "$shape" --device metal --dtype "$dtype" \
          --prefill "${BENCH_PREFILL:-512}" --decode "${BENCH_DECODE:-128}" --runs 3 --warmup 1
        continue
      fi
      "$mamba2" bench --shape "$shape" --device metal --dtype "$dtype" \
        --prefill "${BENCH_PREFILL:-512}" --decode "${BENCH_DECODE:-128}" --runs 3 --warmup 1 |
        tail -1 | tee -a "$out/bench.jsonl" || return 1
      key=$(printf 'LLAMA_GGUF_%s_%s' "$shape" "$dtype" | tr 'a-z.' 'A-Z_')
      gguf=${!key:-}
      if [ -n "${LLAMA_BENCH:-}" ] && [ -n "$gguf" ]; then
        "$LLAMA_BENCH" -m "$gguf" -p "${BENCH_PREFILL:-512}" -n "${BENCH_DECODE:-128}" -ngl 99 -o json |
          python3 -c 'import json,sys
for r in json.load(sys.stdin):
    test = "pp" if r.get("n_prompt", 0) > 0 else "tg"
    print(json.dumps({"shape": sys.argv[1], "dtype": sys.argv[2], "test": test, "tok_s": r["avg_ts"]}))' \
            "$shape" "$dtype" >>"$out/llama.jsonl" || echo "llama-bench failed on $gguf"
      fi
    done
  done
  if [ $dry = 1 ]; then
    x python3 scripts/verify_metal.py table "$out/bench.jsonl" "$out/llama.jsonl"
    return
  fi
  python3 scripts/verify_metal.py table "$out/bench.jsonl" "$out/llama.jsonl" | tee "$out/table.md"
}

needs_cli=0
for s in "${steps[@]}"; do [ "$s" = tests ] || needs_cli=1; done
if [ $needs_cli = 1 ]; then
  step build build_cli
  [ $dry = 1 ] || [ -x "$mamba2" ] || die 1 "the CLI did not build (log: $out/build.log)"
fi
for s in "${steps[@]}"; do
  case $s in
    tests) step tests parity_tests ;;
    fixtures) step fixtures x python3 scripts/verify_metal.py fixtures "$mamba2" ;;
    golden) step golden x python3 scripts/verify_metal.py golden "$mamba2" ;;
    bench) step bench bench_all ;;
  esac
done
[ $dry = 0 ] || exit 0

if [ ${#failed[@]} -eq 0 ]; then
  echo "verify-metal: all steps passed (${steps[*]}); results in $out/"
else
  echo "verify-metal: FAILED: ${failed[*]}; logs in $out/"
  exit 1
fi
