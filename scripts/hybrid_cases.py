"""The hybrid fixture cases (tests/fixtures/hybrid/<case>/) and the Hub spelling of their configs.

Used by scripts/hybrid_fixtures.py; see there and tests/fixtures/hybrid/README.md.
"""

from __future__ import annotations

from dataclasses import dataclass

INF = float("inf")
DEFAULT_LIMIT = (0.0, INF)

ARCHITECTURES = {
    "granitemoehybrid": "GraniteMoeHybridForCausalLM",
    "nemotron_h": "NemotronHForCausalLM",
    "falcon_h1": "FalconH1ForCausalLM",
    "bamba": "BambaForCausalLM",
}


@dataclass
class Case:
    name: str
    family: str
    seed: int
    batch: int
    seq: int
    prefill_len: int  # P: tokens of the first cached forward of the decode run
    splits: tuple  # (p1, p2): the continued run feeds [0,p1), [p1,p2), [p2,seq)
    config: dict  # kwargs of the family's config class (transformers 5 spelling)
    emb_std: float = 0.2
    head_std: float = 0.2  # lm_head rows (untied only)
    in_gain: float = 0.85  # input projections: std = in_gain / sqrt(fan_in)
    out_gain: float = 0.8  # output projections: std = out_gain / sqrt(fan_in)
    hub_sharded: bool = False  # hub/ weights in two shards + index (as the big repos are)


COMMON = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CASES = [
    # Granite 4.0-H style, dense (no experts): every layer = mixer + shared_mlp, all four µP
    # multipliers non-trivial, NoPE attention (position_embedding_type "nope"), tied embeddings.
    Case(
        name="granite_nope_tied_b2",
        family="granitemoehybrid",
        seed=11001,
        batch=2,
        seq=22,
        prefill_len=11,
        splits=(10, 17),
        config=dict(
            COMMON,
            hidden_size=32,
            num_hidden_layers=4,
            layer_types=["mamba", "attention", "mamba", "attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            shared_intermediate_size=32,
            intermediate_size=32,
            num_local_experts=0,
            num_experts_per_tok=0,
            position_embedding_type="nope",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True,
            embedding_multiplier=12.0,
            residual_multiplier=0.22,
            attention_multiplier=0.125,
            logits_scaling=1.5,
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_n_groups=2,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=8,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
        ),
        emb_std=0.25,
    ),
    # Granite with RoPE, untied, mamba_expand 1, a time_step_limit that binds on both sides,
    # layer 0 = attention.
    Case(
        name="granite_rope_untied_limit_b1",
        family="granitemoehybrid",
        seed=12002,
        batch=1,
        seq=37,
        prefill_len=15,
        splits=(9, 21),
        config=dict(
            COMMON,
            hidden_size=32,
            num_hidden_layers=4,
            layer_types=["attention", "mamba", "mamba", "attention"],
            num_attention_heads=4,
            num_key_value_heads=2,
            shared_intermediate_size=32,
            intermediate_size=32,
            num_local_experts=0,
            num_experts_per_tok=0,
            position_embedding_type="rope",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            embedding_multiplier=10.0,
            residual_multiplier=0.3,
            attention_multiplier=0.0625,
            logits_scaling=6.0,
            mamba_n_heads=2,
            mamba_d_head=16,
            mamba_n_groups=2,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_expand=1,
            mamba_chunk_size=16,
            time_step_limit=(0.005, 0.05),
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
        ),
        emb_std=0.1,
        head_std=1.0,
    ),
    # Nemotron-H "M-M*-M*-" (3 Mamba-2, 2 attention, 3 ReLU² MLP), n_groups 2 (2 heads per
    # group), chunk 8, batch 3; the chunked path clamps dt >= time_step_min (the default 0.001).
    Case(
        name="nemotron_h_g2_b3",
        family="nemotron_h",
        seed=21001,
        batch=3,
        seq=20,
        prefill_len=9,
        splits=(5, 12),
        config=dict(
            COMMON,
            hidden_size=32,
            hybrid_override_pattern="M-M*-M*-",
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=32,
            mamba_num_heads=4,
            mamba_head_dim=16,
            n_groups=2,
            ssm_state_size=16,
            conv_kernel=4,
            expand=2,
            chunk_size=8,
            time_step_min=0.001,
            layer_norm_epsilon=1e-5,
            max_position_embeddings=4096,
        ),
    ),
    # Nemotron-H "*M-M*-": attention first, mamba_head_dim 80 (d_inner 160 = 5 x hidden), one head
    # per group, chunk 16, time_step_min 0.01 (the chunked path's clamp binds hard).
    Case(
        name="nemotron_h_hd80_b1",
        family="nemotron_h",
        seed=22002,
        batch=1,
        seq=33,
        prefill_len=14,
        splits=(6, 19),
        config=dict(
            COMMON,
            hidden_size=32,
            hybrid_override_pattern="*M-M*-",
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=32,
            mamba_num_heads=2,
            mamba_head_dim=80,
            n_groups=2,
            ssm_state_size=16,
            conv_kernel=4,
            expand=5,
            chunk_size=16,
            time_step_min=0.01,
            layer_norm_epsilon=1e-5,
            max_position_embeddings=4096,
        ),
    ),
    # Falcon-H1: attention and Mamba-2 in parallel in every layer, every µP multiplier distinct,
    # d_ssm 64 != 2 x hidden 40, head_dim 8 != 40/4, gated RMSNorm with norm_before_gate, n_groups 2.
    Case(
        name="falcon_h1_rmsnorm_g2_b2",
        family="falcon_h1",
        seed=31001,
        batch=2,
        seq=22,
        prefill_len=11,
        splits=(7, 16),
        config=dict(
            COMMON,
            hidden_size=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=32,
            mamba_d_ssm=64,
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_n_groups=2,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=8,
            mamba_rms_norm=True,
            mamba_norm_before_gate=True,
            rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            tie_word_embeddings=False,
            embedding_multiplier=2.5,
            lm_head_multiplier=0.33,
            key_multiplier=0.6,
            attention_in_multiplier=1.3,
            attention_out_multiplier=0.85,
            mlp_multipliers=[0.9, 0.55],
            ssm_in_multiplier=1.25,
            ssm_out_multiplier=0.7,
            ssm_multipliers=[0.35, 0.25, 0.45, 0.5, 0.8],
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
        ),
        emb_std=0.4,
        head_std=0.5,
    ),
    # Falcon-H1 without the gated norm (y * silu(z) only), n_groups 1, 3 Mamba heads, tied
    # embeddings, rope_theta 1e11 as the published models; hub/ weights sharded.
    Case(
        name="falcon_h1_nonorm_tied_b1",
        family="falcon_h1",
        seed=32002,
        batch=1,
        seq=35,
        prefill_len=17,
        splits=(4, 22),
        config=dict(
            COMMON,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=12,
            intermediate_size=32,
            mamba_d_ssm=48,
            mamba_n_heads=3,
            mamba_d_head=16,
            mamba_n_groups=1,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=16,
            mamba_rms_norm=False,
            mamba_norm_before_gate=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e11},
            tie_word_embeddings=True,
            embedding_multiplier=3.0,
            lm_head_multiplier=0.62,
            key_multiplier=0.45,
            attention_in_multiplier=0.8,
            attention_out_multiplier=1.2,
            mlp_multipliers=[1.4, 0.65],
            ssm_in_multiplier=0.9,
            ssm_out_multiplier=1.1,
            ssm_multipliers=[0.6, 1.5, 0.7, 1.2, 0.3],
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
        ),
        emb_std=0.3,
        hub_sharded=True,
    ),
    # Bamba: attention at layers 1 and 3, RoPE on half of each head (partial_rotary_factor 0.5 is
    # hard-coded by HF), SwiGLU MLP in every layer, batch 2.
    Case(
        name="bamba_b2",
        family="bamba",
        seed=41001,
        batch=2,
        seq=22,
        prefill_len=10,
        splits=(3, 13),
        config=dict(
            COMMON,
            hidden_size=32,
            num_hidden_layers=4,
            attn_layer_indices=[1, 3],
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            mamba_n_heads=4,
            mamba_d_head=16,
            mamba_n_groups=1,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_expand=2,
            mamba_chunk_size=8,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
            max_position_embeddings=4096,
        ),
    ),
]


def case_names() -> list:
    return [c.name for c in CASES]


# --------------------------------------------------------------------------------------------
# Hub spelling (config.json of the published repos, pre-transformers-5)
# --------------------------------------------------------------------------------------------
def hub_config(case: Case, cfg) -> dict:
    """config.json as the published Hub repos spell it, for this case's model."""
    c = case.config
    base = {
        "architectures": [ARCHITECTURES[case.family]],
        "model_type": case.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
    }
    if case.family == "granitemoehybrid":
        return base | {
            "num_hidden_layers": cfg.num_hidden_layers,
            "layer_types": list(c["layer_types"]),  # "mamba" / "attention"
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "attention_bias": cfg.attention_bias,
            "attention_dropout": 0.0,
            "attention_multiplier": cfg.attention_multiplier,
            "embedding_multiplier": cfg.embedding_multiplier,
            "residual_multiplier": cfg.residual_multiplier,
            "logits_scaling": cfg.logits_scaling,
            "hidden_act": cfg.hidden_act,
            "intermediate_size": cfg.intermediate_size,
            "shared_intermediate_size": cfg.shared_intermediate_size,
            "num_local_experts": cfg.num_local_experts,
            "num_experts_per_tok": cfg.num_experts_per_tok,
            "output_router_logits": False,
            "router_aux_loss_coef": cfg.router_aux_loss_coef,
            "position_embedding_type": cfg.position_embedding_type,
            "rope_theta": cfg.rope_parameters["rope_theta"],
            "rope_scaling": None,
            "rms_norm_eps": cfg.rms_norm_eps,
            "normalization_function": "rmsnorm",
            "init_method": "mup",
            "mamba_n_heads": cfg.mamba_n_heads,
            "mamba_d_head": cfg.mamba_d_head,
            "mamba_n_groups": cfg.mamba_n_groups,
            "mamba_d_state": cfg.mamba_d_state,
            "mamba_d_conv": cfg.mamba_d_conv,
            "mamba_expand": cfg.mamba_expand,
            "mamba_chunk_size": cfg.mamba_chunk_size,
            "mamba_conv_bias": cfg.mamba_conv_bias,
            "mamba_proj_bias": cfg.mamba_proj_bias,
        } | ({"time_step_limit": list(cfg.time_step_limit)} if tuple(cfg.time_step_limit) != DEFAULT_LIMIT else {})
    if case.family == "nemotron_h":
        pattern = cfg.hybrid_override_pattern
        return base | {
            "hybrid_override_pattern": pattern,
            "num_hidden_layers": len(pattern),
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            # The Nemotron-H v1 repos name the attention head size `attention_head_dim` (remote
            # code); transformers 5.24 reads only `head_dim` (default 128). Both are written.
            "attention_head_dim": cfg.head_dim,
            "head_dim": cfg.head_dim,
            "attention_bias": cfg.attention_bias,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "intermediate_size": cfg.intermediate_size,
            "mlp_bias": cfg.mlp_bias,
            "mlp_hidden_act": "relu2",
            "mamba_num_heads": cfg.mamba_num_heads,
            "mamba_head_dim": cfg.mamba_head_dim,
            "mamba_hidden_act": "silu",
            "mamba_proj_bias": cfg.mamba_proj_bias,
            "n_groups": cfg.n_groups,
            "ssm_state_size": cfg.ssm_state_size,
            "conv_kernel": cfg.conv_kernel,
            "expand": cfg.expand,
            "chunk_size": cfg.chunk_size,
            "use_conv_bias": cfg.use_conv_bias,
            "use_bias": cfg.use_bias,
            "time_step_min": cfg.time_step_min,
            "time_step_max": cfg.time_step_max,
            "time_step_floor": cfg.time_step_floor,
            "time_step_limit": list(cfg.time_step_limit),
            "layer_norm_epsilon": cfg.layer_norm_epsilon,
            "rms_norm_eps": cfg.layer_norm_epsilon,
            "residual_in_fp32": False,
            "rescale_prenorm_residual": True,
            "num_logits_to_keep": 1,
            "use_mamba_kernels": True,
            "sliding_window": None,
        }
    if case.family == "falcon_h1":
        return base | {
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "attention_bias": cfg.attention_bias,
            "attention_dropout": 0.0,
            "attn_layer_indices": None,
            "hidden_act": cfg.hidden_act,
            "intermediate_size": cfg.intermediate_size,
            "mlp_bias": cfg.mlp_bias,
            "mlp_expansion_factor": (
                cfg.intermediate_size // cfg.hidden_size if cfg.intermediate_size % cfg.hidden_size == 0 else None
            ),
            "projectors_bias": cfg.projectors_bias,
            "rope_theta": cfg.rope_parameters["rope_theta"],
            "rope_scaling": None,
            "rms_norm_eps": cfg.rms_norm_eps,
            "mamba_d_ssm": cfg.mamba_d_ssm,
            "mamba_n_heads": cfg.mamba_n_heads,
            "mamba_d_head": cfg.mamba_d_head,
            "mamba_n_groups": cfg.mamba_n_groups,
            "mamba_d_state": cfg.mamba_d_state,
            "mamba_d_conv": cfg.mamba_d_conv,
            "mamba_expand": cfg.mamba_expand,
            "mamba_chunk_size": cfg.mamba_chunk_size,
            "mamba_conv_bias": cfg.mamba_conv_bias,
            "mamba_proj_bias": cfg.mamba_proj_bias,
            "mamba_rms_norm": cfg.mamba_rms_norm,
            "mamba_norm_before_gate": cfg.mamba_norm_before_gate,
            "mamba_use_mlp": True,
            "embedding_multiplier": cfg.embedding_multiplier,
            "lm_head_multiplier": cfg.lm_head_multiplier,
            "key_multiplier": cfg.key_multiplier,
            "attention_in_multiplier": cfg.attention_in_multiplier,
            "attention_out_multiplier": cfg.attention_out_multiplier,
            "mlp_multipliers": list(cfg.mlp_multipliers),
            "ssm_in_multiplier": cfg.ssm_in_multiplier,
            "ssm_out_multiplier": cfg.ssm_out_multiplier,
            "ssm_multipliers": list(cfg.ssm_multipliers),
            "num_logits_to_keep": 1,
        }
    if case.family == "bamba":
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        return base | {
            "num_hidden_layers": cfg.num_hidden_layers,
            "attn_layer_indices": list(cfg.attn_layer_indices),
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "attn_rotary_emb": head_dim // 2,
            "attention_dropout": 0.0,
            "hidden_act": cfg.hidden_act,
            "intermediate_size": cfg.intermediate_size,
            "rope_theta": cfg.rope_parameters["rope_theta"],
            "rms_norm_eps": cfg.rms_norm_eps,
            "mamba_n_heads": cfg.mamba_n_heads,
            "mamba_d_head": cfg.mamba_d_head,
            "mamba_n_groups": cfg.mamba_n_groups,
            "mamba_d_state": cfg.mamba_d_state,
            "mamba_d_conv": cfg.mamba_d_conv,
            "mamba_expand": cfg.mamba_expand,
            "mamba_chunk_size": cfg.mamba_chunk_size,
            "mamba_conv_bias": cfg.mamba_conv_bias,
            "mamba_proj_bias": cfg.mamba_proj_bias,
            "num_logits_to_keep": 1,
            "use_mamba_kernels": True,
            "z_loss_coefficient": 0.0,
        }
    raise AssertionError(case.family)


# Keys that only the Hub spelling carries (informational for transformers 5.24, or spelled
# differently): they are allowed to differ between the two loaded configs.
HUB_ONLY_KEYS = {
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "normalization_function",
    "init_method",
    "attention_head_dim",
    "rms_norm_eps",  # nemotron_h only (its config class reads layer_norm_epsilon)
    "attn_layer_indices",  # falcon_h1 only (null, unused)
    "mlp_expansion_factor",
    "mamba_use_mlp",
    "attn_rotary_emb",
    "use_mamba_kernels",  # bamba only (deprecated, no effect; nemotron_h keeps it as a field)
    "rope_scaling",
}


# Tensor names: HF 5.24's save_pretrained writes the Hub's names for all four families
# (nemotron_h: it maps the in-memory `model.` back to the checkpoint's `backbone.`). The Hub's
# names are therefore the saved names; this map stays empty unless a family differs.
HUB_RENAMES = {"granitemoehybrid": [], "nemotron_h": [], "falcon_h1": [], "bamba": []}
