#!/usr/bin/env bash
# The project's test command (README): formatting, lints, then every test of the workspace.
# The Metal harness tests compile kernels/metal/*.metal with clang >= 17 (Debian's clang-19:
# _Float16/__bf16 arithmetic, which Debian's default clang 14 lacks on x86-64); it is installed
# here when missing and possible (root with apt), else the script stops with the command to run.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup component add rustfmt clippy >/dev/null 2>&1 || true
if ! command -v clang++-19 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang-19 >/dev/null
  else
    echo "scripts/test.sh: clang-19 is needed for the Metal harness tests; install it with:" >&2
    echo "  sudo apt-get install clang-19" >&2
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
