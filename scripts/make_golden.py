#!/usr/bin/env python3
"""Record HF transformers' outputs on the shipped tiny Mamba-2, as golden data for Rust tests.

Run by hand after (re)training models/mamba2-tiny; not run by CI:
  python scripts/make_golden.py --model models/mamba2-tiny --out tests/golden

Reference: HF transformers `Mamba2ForCausalLM`, pure-PyTorch path on CPU (no mamba_ssm /
causal_conv1d kernels), loading the SHIPPED 16-bit weights. Writes

  tests/golden/mamba2_tiny_golden.safetensors
    prompt{i}_ids            i64 (P_i,)      prompt token ids (tokenizer.encode, no special tokens)
    prompt{i}_greedy_ids     i64 (32,)       the 32 new tokens of HF greedy generate(), f32 weights
    text_ids                 i64 (T,)        the fixed logits text, T ~ 40 (< chunk_size)
    text_logits_f32          f32 (T, V)      one forward, weights upcast to f32
    text_logits_f32_stepwise f32 (T, V)      same, fed one token at a time through HF's cache
    text_logits_stored_dtype f32 (T, V)      one forward in the stored dtype (bf16), logits as f32
    long_text_ids            i64 (L,)        a longer text, L > 2 * chunk_size and not a multiple
    long_text_logits_f32     f32 (L, V)      one forward, f32
  tests/golden/mamba2_tiny_golden.json   prompts, texts, decoded generations, shapes, versions,
                                         per-step greedy top-1/top-2 margins, diff statistics.

The HF grouped gated RMSNorm is checked to normalise per group of d_inner/n_groups (mamba_ssm
semantics) and patched if it does not, the same way train_tiny_model.py does.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import GenerationConfig, Mamba2ForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny_model import check_grouped_gated_norm  # noqa: E402

PROMPTS = ["Once upon a time", "The old man said"]
NEW_TOKENS = 32
TEXT = ("It was a fine morning in October, and Mrs. Bennet had resolved that her daughters "
        "should walk to Meryton before dinner. \"Indeed!\" said Elizabeth; \"then we must go at once.\"")
LONG_TEXT = (
    "Sir Thomas was very kind to his niece, though she was too much afraid of him to perceive it. "
    "When the carriage came round to the door, she stood in the hall with her cousins, and tried "
    "to look as if she had never wished to go anywhere else.\n\n"
    "\"You will be very comfortable here,\" said Lady Bertram, with a smile; \"and if you are not, "
    "you must tell Mrs. Norris, who knows everything.\" Fanny thanked her, but said nothing more; "
    "and the evening passed, as evenings at Mansfield generally did, in quiet conversation and "
    "a little music. The next morning brought letters from London, and with them the news that "
    "Edmund would come home before the end of the week; a piece of intelligence which gave more "
    "pleasure to his cousin than she could have owned to any body."
)


def load(folder: Path, dtype: torch.dtype) -> Mamba2ForCausalLM:
    model = Mamba2ForCausalLM.from_pretrained(str(folder), dtype=dtype)
    model.eval()
    return model


@torch.no_grad()
def greedy(model, tok: Tokenizer, prompt: str) -> tuple:
    """HF greedy generate (cached decode path) of exactly NEW_TOKENS tokens, plus margins."""
    ids = torch.tensor([tok.encode(prompt).ids])
    # No EOS stopping, so exactly NEW_TOKENS come back; the engine's test compares the first 32.
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=0, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.token_to_id("<|endoftext|>"),
                              output_scores=True, return_dict_in_generate=True)
    out = model.generate(ids, generation_config=config)
    new = out.sequences[0, ids.shape[1]:]
    margins = []
    for scores in out.scores:
        top = torch.topk(scores[0].float(), 2).values
        margins.append(float(top[0] - top[1]))
    # Cross-check against argmax of full (uncached) forwards over the growing sequence.
    seq = ids
    for _ in range(NEW_TOKENS):
        nxt = model(input_ids=seq).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    uncached_agrees = bool(torch.equal(seq[0, ids.shape[1]:], new))
    return ids[0], new, margins, uncached_agrees


@torch.no_grad()
def sequential_reference(weights: dict, config: dict, ids: torch.Tensor) -> torch.Tensor:
    """Independent float64 Mamba-2 forward, one token at a time, written from mamba_ssm semantics.

    Not HF code: a cross-check that HF's chunked path computes what mamba_ssm defines (grouped B/C
    with heads of a group contiguous, gated RMSNorm per group of d_inner/n_groups after the gate).
    """
    w = {k: v.double() for k, v in weights.items()}
    d_inner = config["expand"] * config["hidden_size"]
    n_heads, head_dim = config["num_heads"], config["head_dim"]
    groups, d_state, eps = config["n_groups"], config["state_size"], config["layer_norm_epsilon"]
    heads_per_group = n_heads // groups

    def rmsnorm(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    hidden = w["backbone.embeddings.weight"][ids]  # (T, d_model)
    for layer in range(config["num_hidden_layers"]):
        p = f"backbone.layers.{layer}."
        zxbcdt = rmsnorm(hidden, w[p + "norm.weight"]) @ w[p + "mixer.in_proj.weight"].T
        z, xbc, dt = zxbcdt.split([d_inner, d_inner + 2 * groups * d_state, n_heads], dim=-1)
        conv_w, conv_b = w[p + "mixer.conv1d.weight"][:, 0], w[p + "mixer.conv1d.bias"]  # (C, K), (C,)
        k = conv_w.shape[1]
        padded = torch.cat([torch.zeros(k - 1, xbc.shape[1], dtype=xbc.dtype), xbc])  # (T+K-1, C)
        xbc = torch.stack([(padded[t:t + k] * conv_w.T).sum(0) for t in range(len(ids))]) + conv_b
        xbc = torch.nn.functional.silu(xbc)
        x, b, c = xbc.split([d_inner, groups * d_state, groups * d_state], dim=-1)
        dt = torch.nn.functional.softplus(dt + w[p + "mixer.dt_bias"])  # (T, H)
        a = -torch.exp(w[p + "mixer.A_log"])  # (H,)
        state = torch.zeros(n_heads, head_dim, d_state, dtype=torch.float64)
        ys = []
        for t in range(len(ids)):
            xt = x[t].view(n_heads, head_dim)
            bt = b[t].view(groups, d_state).repeat_interleave(heads_per_group, 0)  # (H, N)
            ct = c[t].view(groups, d_state).repeat_interleave(heads_per_group, 0)  # (H, N)
            decay = torch.exp(dt[t] * a)  # (H,)
            state = decay[:, None, None] * state + (dt[t][:, None] * xt)[:, :, None] * bt[:, None, :]
            yt = (state * ct[:, None, :]).sum(-1) + w[p + "mixer.D"][:, None] * xt  # (H, P)
            ys.append(yt.reshape(d_inner))
        y = torch.stack(ys) * torch.nn.functional.silu(z)  # (T, d_inner)
        y = y.view(len(ids), groups, d_inner // groups)
        y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)).view(len(ids), d_inner)
        hidden = hidden + (y * w[p + "mixer.norm.weight"]) @ w[p + "mixer.out_proj.weight"].T
    hidden = rmsnorm(hidden, w["backbone.norm_f.weight"])
    return (hidden @ w["backbone.embeddings.weight"].T).float()


@torch.no_grad()
def logits_stepwise(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids[:, :1], use_cache=True)
    cache, rows = out.cache, [out.logits[0, -1]]
    for i in range(1, ids.shape[1]):
        out = model(input_ids=ids[:, i:i + 1], cache=cache, use_cache=True)
        cache = out.cache
        rows.append(out.logits[0, -1])
    return torch.stack(rows).float()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/mamba2-tiny"))
    parser.add_argument("--out", type=Path, default=Path("tests/golden"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    norm_note = check_grouped_gated_norm()
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    config = json.loads((args.model / "config.json").read_text())
    stored_dtype = getattr(torch, config["torch_dtype"])
    model = load(args.model, torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tensors, meta = {}, {
        "model": str(args.model), "stored_dtype": config["torch_dtype"],
        "reference": "HF transformers Mamba2ForCausalLM, PyTorch path, CPU, weights upcast to f32",
        "gated_norm": norm_note, "torch": torch.__version__,
        "transformers": sys.modules["transformers"].__version__,
        "prompts": [], "text": TEXT, "long_text": LONG_TEXT, "new_tokens": NEW_TOKENS,
    }

    for i, prompt in enumerate(PROMPTS):
        prompt_ids, new, margins, agrees = greedy(model, tok, prompt)
        tensors[f"prompt{i}_ids"] = prompt_ids.to(torch.int64)
        tensors[f"prompt{i}_greedy_ids"] = new.to(torch.int64)
        meta["prompts"].append({
            "prompt": prompt, "prompt_ids": prompt_ids.tolist(), "greedy_ids": new.tolist(),
            "greedy_text": tok.decode(new.tolist(), skip_special_tokens=False),
            "full_text": tok.decode(prompt_ids.tolist() + new.tolist(), skip_special_tokens=False),
            "min_top1_top2_margin": min(margins), "top1_top2_margins": margins,
            "uncached_argmax_agrees": agrees,
        })
        print(f"{prompt!r} -> {meta['prompts'][-1]['greedy_text']!r} (min margin {min(margins):.4f}, "
              f"uncached agrees: {agrees})")

    text_ids = torch.tensor([tok.encode(TEXT).ids])
    long_ids = torch.tensor([tok.encode(LONG_TEXT).ids])
    assert tok.decode(text_ids[0].tolist()) == TEXT and tok.decode(long_ids[0].tolist()) == LONG_TEXT
    with torch.no_grad():
        logits_f32 = model(input_ids=text_ids).logits[0].float()
        long_logits = model(input_ids=long_ids).logits[0].float()
    stepwise = logits_stepwise(model, text_ids)
    model_stored = load(args.model, stored_dtype)
    assert all(p.dtype == stored_dtype for p in model_stored.parameters())
    with torch.no_grad():
        logits_stored = model_stored(input_ids=text_ids).logits[0].float()

    # Cross-check HF against the independent sequential reference on the shipped weights.
    reference = sequential_reference(load_file(str(args.model / "model.safetensors")), config, text_ids[0])
    reference_diff = float((reference - logits_f32).abs().max())
    assert reference_diff < 1e-3, f"HF and the sequential mamba_ssm-semantics reference differ by {reference_diff}"
    long_reference = sequential_reference(load_file(str(args.model / "model.safetensors")), config, long_ids[0])
    long_reference_diff = float((long_reference - long_logits).abs().max())
    assert long_reference_diff < 1e-3, f"long text: HF and the reference differ by {long_reference_diff}"

    tensors.update({
        "text_ids": text_ids[0].to(torch.int64),
        "text_logits_f32": logits_f32.contiguous(),
        "text_logits_f32_stepwise": stepwise.contiguous(),
        "text_logits_stored_dtype": logits_stored.contiguous(),
        "long_text_ids": long_ids[0].to(torch.int64),
        "long_text_logits_f32": long_logits.contiguous(),
    })
    chunk = config["chunk_size"]
    meta.update({
        "text_tokens": text_ids.shape[1], "long_text_tokens": long_ids.shape[1], "chunk_size": chunk,
        "vocab_size": logits_f32.shape[-1],
        "max_abs_diff_f32_vs_independent_f64_sequential_reference": reference_diff,
        "max_abs_diff_long_f32_vs_independent_f64_sequential_reference": long_reference_diff,
        "max_abs_diff_f32_vs_stepwise": float((logits_f32 - stepwise).abs().max()),
        "max_abs_diff_f32_vs_stored_dtype": float((logits_f32 - logits_stored).abs().max()),
        "max_abs_logit_f32": float(logits_f32.abs().max()),
        "argmax_agree_f32_vs_stored_dtype": float((logits_f32.argmax(-1) == logits_stored.argmax(-1))
                                                  .float().mean()),
        "tensors": {k: {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
                    for k, v in tensors.items()},
    })
    assert long_ids.shape[1] > 2 * chunk and long_ids.shape[1] % chunk != 0
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / "mamba2_tiny_golden.safetensors"),
              metadata={"model": "models/mamba2-tiny", "reference": "transformers Mamba2ForCausalLM f32 CPU"})
    (args.out / "mamba2_tiny_golden.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in meta.items() if k not in ("tensors", "prompts")}, indent=2))


if __name__ == "__main__":
    main()
