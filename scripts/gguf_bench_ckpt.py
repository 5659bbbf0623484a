#!/usr/bin/env python3
"""A random-weight HF Mamba2ForCausalLM at the mamba2-130m shape, for scripts/bench_gguf_cpu.sh.

    python3 scripts/gguf_bench_ckpt.py OUT_DIR

hidden 768, 24 layers, d_state 128, head dim 64 (24 heads), 1 group, vocab 50288, tied; weights
in realistic ranges (linear and embedding normal std 0.02, norms 1, A_log = log U(1, 16),
softplus(dt_bias) log-uniform in [1e-3, 1e-1], D = 1, conv1d U(-0.5, 0.5), biases 0), saved in
f32 with the bundled model's tokenizer.json beside it (llama.cpp's converter pads the token list
to the vocabulary: pass it `--assume-pretokenizer gpt-2`). Deterministic (seed 0).
"""
import math
import shutil
import sys
from pathlib import Path

import torch
from transformers import Mamba2Config, Mamba2ForCausalLM

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
cfg = Mamba2Config(hidden_size=768, num_hidden_layers=24, state_size=128, head_dim=64,
                   num_heads=24, n_groups=1, expand=2, conv_kernel=4, vocab_size=50288,
                   tie_word_embeddings=True, use_bias=False, use_conv_bias=True,
                   residual_in_fp32=True, chunk_size=256)
model = Mamba2ForCausalLM(cfg)
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.log(torch.empty_like(p).uniform_(1, 16)))
        elif name.endswith("dt_bias"):
            dt = torch.exp(torch.empty_like(p).uniform_(math.log(1e-3), math.log(1e-1)))
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif name.endswith(".D") or "norm" in name:
            p.fill_(1.0)
        elif "conv1d.weight" in name:
            p.uniform_(-0.5, 0.5)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0, 0.02)
model.save_pretrained(out)
shutil.copy(Path(__file__).resolve().parent.parent / "models/mamba2-tiny/tokenizer.json",
            out / "tokenizer.json")
print(f"wrote {out}")
