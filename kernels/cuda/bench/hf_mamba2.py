"""HF transformers Mamba2ForCausalLM on random weights of a real Mamba-2 shape: prefill and decode
throughput on CUDA, the competitor row of BENCHMARKS.md "CUDA (issue 6)".

Run on the GPU machine (its python3 has torch + transformers):
    python3 kernels/cuda/bench/hf_mamba2.py --shape 1.3b --prefill 2048 --decode 128 --batch 1
Timing: CUDA synchronisation around each phase (decode = generate() minus a prefill), one warm-up, median of --runs runs.
Which kernels HF picked is printed: mamba_ssm's Triton SSD scan and state update are used when
`mamba_ssm` is importable (fetch_mamba_ssm_triton.sh assembles its Python/Triton part; put it on
PYTHONPATH), causal_conv1d's CUDA conv when that is importable (else PyTorch's conv1d); without
either, HF runs its pure-PyTorch path.
"""
import argparse, importlib.util, statistics, sys, time
import torch
from transformers import Mamba2Config, Mamba2ForCausalLM

SHAPES = {  # d_model, n_layer (mamba2-*: expand 2, headdim 64, d_state 128, ngroups 1)
    "130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64),
}

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1.3b")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    d_model, n_layer = SHAPES[a.shape]
    cfg = Mamba2Config(hidden_size=d_model, num_hidden_layers=n_layer, state_size=128, expand=2,
                       head_dim=64, num_heads=2 * d_model // 64, n_groups=1, vocab_size=50288,
                       chunk_size=256, conv_kernel=4)
    torch.manual_seed(0)
    with torch.device("cuda"):  # initialise on the GPU (CPU init of 1.3B parameters is slow)
        model = Mamba2ForCausalLM(cfg).to(dtype=torch.bfloat16).eval()
    triton_ssd = "mamba_ssm.ops.triton.ssd_combined" in sys.modules
    conv = importlib.util.find_spec("causal_conv1d") is not None
    print(f"hf {a.shape} bf16 batch {a.batch}: mamba_ssm Triton SSD: {triton_ssd}, "
          f"causal_conv1d: {conv}")
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.prefill), device="cuda")
    pre, dec = [], []
    with torch.no_grad():
        for run in range(a.runs + 1):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            torch.cuda.synchronize(); t1 = time.perf_counter()
            torch.cuda.synchronize(); t1b = time.perf_counter()
            model.generate(ids, max_new_tokens=a.decode, min_new_tokens=a.decode, do_sample=False,
                           use_cache=True, pad_token_id=0)
            torch.cuda.synchronize(); t2b = time.perf_counter()
            if run > 0:
                # generate = one prefill + decode steps: subtract the prefill timed just before.
                pre.append(t1 - t0); dec.append((t2b - t1b) - (t1 - t0))
    p, d = statistics.median(pre), statistics.median(dec)
    print(f"hf prefill {a.prefill}: {a.batch * a.prefill / p:.0f} tok/s ({p * 1e3:.1f} ms); "
          f"decode: {a.batch * a.decode / d:.1f} tok/s ({d / a.decode * 1e3:.2f} ms/step)")

if __name__ == "__main__":
    main()
