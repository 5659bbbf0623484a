#!/usr/bin/env bash
# Builds the CPU op parity tests and the HF fixture tests for aarch64-unknown-linux-gnu and runs
# them under qemu-user, so the NEON kernels (crates/mamba2-ops/src/cpu/neon.rs, linear/neon.rs)
# are checked against the references on an x86-64 machine. The tests assert that the NEON tier
# served (mamba2_ops::fast_path_tier), not the portable loops.
#
#   bash scripts/test_aarch64_qemu.sh            # parity tests + HF fixtures
#   bash scripts/test_aarch64_qemu.sh --quick    # the NEON ops' tests only (CI): cpu_parity
#                                                # and cpu_linear without the SSD scan (no NEON
#                                                # kernel), the prefill-sized and LM-head linear
#                                                # cases
#
# Needs qemu-user, gcc-aarch64-linux-gnu (the linker) and the Rust target; installs them when
# missing and possible (root with apt), else stops with the commands to run. Builds into its
# own target folder (CARGO_TARGET_DIR, default target/aarch64-qemu) so the x86-64 build is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[ "${1:-}" = "--quick" ] && quick=1

need=()
command -v qemu-aarch64 >/dev/null 2>&1 || need+=(qemu-user)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "scripts/test_aarch64_qemu.sh: missing ${need[*]}; install with:" >&2
    echo "  sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
fi
if ! rustup target list --installed | grep -qx aarch64-unknown-linux-gnu; then
  rustup target add aarch64-unknown-linux-gnu
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/aarch64-qemu}"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
target=(--target aarch64-unknown-linux-gnu)

# The op parity tests: every CPU fast path against its reference, f32/f16/bf16.
ops=(--test cpu_parity --test cpu_linear)
skip=()
if [ $quick = 1 ]; then
  skip=(-- --skip ssd_ --skip many_rows --skip bf16_prefill_shapes --skip random_shapes_and_layouts
    --skip lm_head_shape)
else
  ops+=(--test cpu_quantized --test cpu_attention --test cpu_rotary_mlp --lib)
fi
cargo test -p mamba2-ops "${target[@]}" "${ops[@]}" "${skip[@]}"

if [ $quick = 0 ]; then
  # Whole models against HF transformers' logits (f32 and bf16, prefill and decode).
  cargo test -p mamba2-rs "${target[@]}" --test hf_fixtures --test hybrid_fixtures
fi
echo "aarch64 (qemu): passed"
