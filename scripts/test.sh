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
