#!/usr/bin/env python3
"""Random-weight HF checkpoints at the hybrid preset shapes, for scripts/bench_hybrid_cpu.sh.

    python3 scripts/hybrid_bench_ckpt.py OUT_DIR [granite-4.0-h-1b] [falcon-h1-1.5b]

Builds the model with transformers' own classes (GraniteMoeHybridForCausalLM with no experts,
FalconH1ForCausalLM) at exactly the sizes of the engine's presets
(crates/mamba2/src/config/presets.rs), fills every tensor with random values in realistic ranges
(linear and embedding weights normal std 0.02, norms 1, A_log = log U(1, 16), dt_bias such that
softplus(dt_bias) is log-uniform in [1e-3, 1e-1], D = 1, conv1d weights U(-0.5, 0.5), biases 0),
saves it in bf16 with save_pretrained to OUT_DIR/<preset>/, and rewrites config.json to the
spelling of the published Hub repos (scripts/hybrid_cases.py: Granite `layer_types`
mamba/attention, top-level `rope_theta`), which llama.cpp's converter needs: it does not
recognise transformers 5's linear_attention/full_attention and would mark every layer SSM.

A tiny byte-level BPE tokenizer (512 tokens, trained here on this repository's scripts) is saved
next to the weights for the converter (`--assume-pretokenizer gpt-2`); the converter pads the
GGUF vocabulary to the config's vocab_size, so the embedding keeps the preset's row count.

Idempotent: a folder whose `.complete` marker exists is left alone.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hybrid_cases import Case, hub_config  # noqa: E402

transformers.logging.set_verbosity_error()

# The preset sizes (crates/mamba2/src/config/presets.rs), in transformers 5.24's config kwargs.
GRANITE_ATTN = (10, 13, 17, 27)
PRESETS = {
    "granite-4.0-h-1b": (
        "granitemoehybrid",
        dict(
            hidden_size=1536,
            num_hidden_layers=40,
            vocab_size=100352,
            num_attention_heads=12,
            num_key_value_heads=4,
            layer_types=["attention" if i in GRANITE_ATTN else "mamba" for i in range(40)],
            mamba_n_heads=48,
            mamba_d_head=64,
            mamba_d_state=128,
            mamba_n_groups=1,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=256,
            shared_intermediate_size=4096,
            intermediate_size=4096,
            num_local_experts=0,
            num_experts_per_tok=0,
            position_embedding_type="nope",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.0078125,
            logits_scaling=6.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=131072,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
    "falcon-h1-1.5b": (
        "falcon_h1",
        dict(
            hidden_size=2048,
            num_hidden_layers=24,
            vocab_size=65537,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=128,
            mamba_d_ssm=3072,
            mamba_n_heads=48,
            mamba_d_head=64,
            mamba_d_state=256,
            mamba_n_groups=1,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=128,
            mamba_rms_norm=False,
            intermediate_size=6144,
            rope_parameters={"rope_type": "default", "rope_theta": 1e11},
            tie_word_embeddings=False,
            # The preset leaves every µP multiplier at its default 1 (engine and HF alike).
            rms_norm_eps=1e-5,
            max_position_embeddings=131072,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
}
CLASSES = {
    "granitemoehybrid": (transformers.GraniteMoeHybridConfig, transformers.GraniteMoeHybridForCausalLM),
    "falcon_h1": (transformers.FalconH1Config, transformers.FalconH1ForCausalLM),
}


@torch.no_grad()
def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    for name, p in model.named_parameters():  # tied lm_head appears once
        leaf = name.rsplit(".", 1)[-1]
        owner = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if leaf == "A_log":
            p.copy_(torch.log(torch.empty(p.shape).uniform_(1.0, 16.0, generator=gen)))
        elif leaf == "dt_bias":
            dt = torch.exp(torch.empty(p.shape).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        elif leaf == "D":
            p.fill_(1.0)
        elif owner == "conv1d" and leaf == "weight":
            p.copy_(torch.empty(p.shape).uniform_(-0.5, 0.5, generator=gen))
        elif leaf == "bias":
            p.zero_()
        elif p.dim() == 1:  # RMSNorm weights
            p.fill_(1.0)
        else:  # embeddings, projections, lm_head
            p.copy_(torch.empty(p.shape).normal_(0.0, 0.02, generator=gen))
        if not torch.isfinite(p).all():
            raise SystemExit(f"{name}: non-finite values")


def tokenizer(out: Path) -> None:
    """A 512-token byte-level BPE (GPT-2 pre-tokenizer), trained on this repository's scripts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    files = sorted(str(p) for p in Path(__file__).resolve().parent.glob("*.py"))
    tok.train(files, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    fast.save_pretrained(out)


def build(preset: str, out: Path) -> None:
    if (out / ".complete").exists():
        print(f"{out}: exists", file=sys.stderr)
        return
    family, kwargs = PRESETS[preset]
    config_cls, model_cls = CLASSES[family]
    cfg = config_cls(**kwargs)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = model_cls(cfg)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model.tie_weights()
    randomize(model, torch.Generator().manual_seed(15))
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    n = sum(p.numel() for p in model.parameters())
    print(f"{preset}: {n / 1e9:.3f} B parameters", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    del model
    hub = hub_config(Case(preset, family, 0, 1, 1, 1, (0, 0), kwargs), cfg)
    hub["torch_dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(hub, indent=2) + "\n")
    tokenizer(out)
    (out / ".complete").write_text("")
    print(f"{out}: written", file=sys.stderr)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    root = Path(sys.argv[1])
    for preset in sys.argv[2:] or list(PRESETS):
        build(preset, root / preset)


if __name__ == "__main__":
    main()
