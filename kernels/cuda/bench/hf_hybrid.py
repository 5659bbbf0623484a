"""HF transformers on random weights of a hybrid Mamba-2 shape (the `mamba2 bench --shape`
presets of crates/mamba2/src/config/presets.rs): prefill and decode throughput on CUDA, the
competitor row of BENCHMARKS.md's hybrid section.

Run on the GPU machine (its python3 has torch + transformers; put fetch_mamba_ssm_triton.sh's
.carry/pylib on PYTHONPATH so HF's Mamba mixers use mamba_ssm's Triton SSD scan):
    python3 kernels/cuda/bench/hf_hybrid.py --shape nemotron-h-8b --prefill 2048 --decode 128
Timing as hf_mamba2.py: synchronisation around each phase, decode = generate() minus a prefill,
one warm-up, median of --runs runs.
"""
import argparse, statistics, sys, time
import torch
import transformers


def nemotron_pattern(n, attn):
    return "".join("*" if i in attn else ("M" if i % 2 == 0 else "-") for i in range(n))


SHAPES = {
    "nemotron-h-8b": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        hidden_size=4096, vocab_size=131072, hybrid_override_pattern=nemotron_pattern(52, {7, 18, 29, 40}),
        mamba_num_heads=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4,
        chunk_size=128, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=21504, mlp_hidden_act="relu2", tie_word_embeddings=False)),
    "granite-4.0-h-1b": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(
        hidden_size=1536, num_hidden_layers=40, vocab_size=100352, num_attention_heads=12,
        num_key_value_heads=4, layer_types=["full_attention" if i in (10, 13, 17, 27) else "linear_attention" for i in range(40)],
        mamba_n_heads=48, mamba_d_head=64, mamba_d_state=128, mamba_n_groups=1, mamba_expand=2,
        shared_intermediate_size=4096, num_local_experts=0, position_embedding_type="nope",
        tie_word_embeddings=True)),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="nemotron-h-8b")
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    cfg_cls, model_cls, kw = SHAPES[a.shape]
    cfg = getattr(transformers, cfg_cls)(**kw)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = getattr(transformers, model_cls)(cfg).to(dtype=torch.bfloat16).eval()
    triton_ssd = "mamba_ssm.ops.triton.ssd_combined" in sys.modules
    print(f"hf {a.shape} bf16 batch {a.batch}: mamba_ssm Triton SSD imported: {triton_ssd}; "
          f"attention: {model.config._attn_implementation}")
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.prefill), device="cuda")
    pre, dec = [], []
    with torch.no_grad():
        for run in range(a.runs + 1):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            model(ids, use_cache=True)
            torch.cuda.synchronize(); t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=a.decode, min_new_tokens=a.decode, do_sample=False,
                           use_cache=True, pad_token_id=0)
            torch.cuda.synchronize(); t2 = time.perf_counter()
            if run > 0:
                pre.append(t1 - t0); dec.append((t2 - t1) - (t1 - t0))
    p, d = statistics.median(pre), statistics.median(dec)
    print(f"hf prefill {a.prefill}: {a.batch * a.prefill / p:.0f} tok/s ({p * 1e3:.1f} ms); "
          f"decode: {a.batch * a.decode / d:.1f} tok/s ({d / a.decode * 1e3:.2f} ms/step)")


if __name__ == "__main__":
    main()
