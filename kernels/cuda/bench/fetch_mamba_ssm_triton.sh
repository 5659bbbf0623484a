#!/usr/bin/env bash
# Assembles, on the build machine, the Python-only part of mamba_ssm that HF transformers'
# Mamba2 uses when it is importable: the Triton SSD chunk scan (`mamba_chunk_scan_combined`) and
# the Triton selective state update. The CUDA extensions of mamba_ssm and causal_conv1d are not
# built (the GPU image has no compiler toolchain for them; HF then runs its PyTorch conv1d), and
# the package's __init__ is replaced by one that does not import them. Nothing of it is
# committed: it lands in .carry/pylib (ignored) and travels to the GPU with `carry`.
# Usage: kernels/cuda/bench/fetch_mamba_ssm_triton.sh   (then PYTHONPATH=.carry/pylib there)
set -euo pipefail
ver=2.3.1
dest=.carry/pylib
tmp=$(mktemp -d)
url=$(curl -s -m 60 https://pypi.org/simple/mamba-ssm/ |
      grep -o "https://files.pythonhosted.org[^\"#]*mamba_ssm-$ver\.tar\.gz" | head -1)
curl -s -m 120 -o "$tmp/m.tar.gz" "$url"
tar -C "$tmp" -xzf "$tmp/m.tar.gz"
src=$tmp/mamba_ssm-$ver/mamba_ssm
rm -rf "$dest/mamba_ssm" && mkdir -p "$dest/mamba_ssm/ops"
cp -r "$src/ops/triton" "$dest/mamba_ssm/ops/"
cp -r "$src/utils" "$dest/mamba_ssm/"
echo "__version__ = \"$ver\"" > "$dest/mamba_ssm/__init__.py"
touch "$dest/mamba_ssm/ops/__init__.py"
# einops: pure Python, imported by the Triton modules.
pip download --no-deps -q -d "$tmp" einops
python3 -m zipfile -e "$tmp"/einops-*.whl "$dest"
rm -rf "$tmp"
echo "mamba_ssm $ver (Triton ops only) and einops in $dest"
