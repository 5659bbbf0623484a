#!/usr/bin/env bash
# The project's test command (README): formatting, lints, then every test of the workspace.
# The Metal harness tests compile kernels/metal/*.metal with clang >= 17 (Debian's clang-19:
# _Float16/__bf16 arithmetic, which Debian's default clang 14 lacks on x86-64); it is installed
# here when missing and possible (root with apt), else the script stops with the command to run.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup component add rustfmt clippy >/dev/null 2>&1 || true
# The same search as msl-harness (crates/msl-harness/src/compile.rs, find_clang): any clang++
# of major version >= 17, MSL_HARNESS_CLANG first.
have_clang17() {
  local c major
  for c in ${MSL_HARNESS_CLANG:-} clang++-{25..17} clang++; do
    major=$("$c" --version 2>/dev/null | head -n1 | sed -n 's/.*version \([0-9]*\).*/\1/p') || true
    [ -n "$major" ] && [ "$major" -ge 17 ] && return 0
  done
  return 1
}
if ! have_clang17; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: installing clang-19 for the Metal harness tests" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang-19 >/dev/null
  else
    echo "scripts/test.sh: the Metal harness tests need clang >= 17; install it, e.g." >&2
    echo "  sudo apt-get update && sudo apt-get install -y clang-19" >&2
    echo "or point MSL_HARNESS_CLANG at a clang++ >= 17." >&2
    exit 1
  fi
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace

# The run above takes the best CPU tier this machine has (AVX-512 where present). Each lower
# x86-64 tier is forced in turn (MAMBA2_CPU_TIER, read by the test harnesses) for the CPU op
# parity tests and the HF fixtures, so the AVX2 kernels and the portable ones are tested too.
# The test binaries are already built: this only runs them (about a minute per tier).
tiers=(generic)
if grep -qw avx512f /proc/cpuinfo 2>/dev/null && grep -qw avx2 /proc/cpuinfo; then
  tiers=(avx2 generic)
fi
for tier in "${tiers[@]}"; do
  echo "== CPU tier $tier"
  # --workspace keeps the features of the run above, so nothing is rebuilt.
  MAMBA2_CPU_TIER=$tier cargo test --workspace --test cpu_parity --test cpu_linear \
    --test cpu_quantized --test cpu_attention --test cpu_rotary_mlp --test hf_fixtures
done
