//! The layer layout of a model: which family wrote the config, the kind of each residual block,
//! and the attention / MLP / multiplier settings the hybrid families add to the Mamba-2 mixer.

/// The model family a config describes; decides tensor names and field spellings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Family {
    /// Pure Mamba-2 (HF `mamba2` or a mamba_ssm `MambaConfig`).
    Mamba2,
    /// IBM Granite-4.0-H (`granitemoehybrid`): every layer is a mixer (Mamba-2 or attention)
    /// followed by a SwiGLU `shared_mlp`.
    GraniteHybrid,
    /// NVIDIA Nemotron-H (`nemotron_h`): one block per layer, Mamba-2, attention or a ReLU² MLP.
    NemotronH,
    /// TII Falcon-H1 (`falcon_h1`): attention and Mamba-2 side by side in every layer, summed,
    /// then a SwiGLU MLP.
    FalconH1,
    /// IBM Bamba (`bamba`): Mamba-2 or attention per layer, then a SwiGLU MLP.
    Bamba,
}

impl Family {
    /// The `model_type` of the family's HF config.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Mamba2 => "mamba2",
            Family::GraniteHybrid => "granitemoehybrid",
            Family::NemotronH => "nemotron_h",
            Family::FalconH1 => "falcon_h1",
            Family::Bamba => "bamba",
        }
    }
}

/// What one residual block computes between its RMSNorm and the residual add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum BlockKind {
    /// The Mamba-2 mixer (SSM state: conv + SSM).
    Mamba,
    /// Causal self-attention (state: a KV cache).
    Attention,
    /// Attention and the Mamba-2 mixer on the same normed input, outputs summed (Falcon-H1).
    MambaAttention,
    /// A feed-forward block (no state).
    Mlp,
    /// A mixture-of-experts block: routed experts plus the always-on shared MLP (no state; see
    /// [`crate::config::MoeConfig`]).
    Moe,
}

impl BlockKind {
    /// Whether the block keeps a conv + SSM state.
    pub fn has_ssm(self) -> bool {
        matches!(self, BlockKind::Mamba | BlockKind::MambaAttention)
    }

    /// Whether the block keeps a KV cache.
    pub fn has_kv(self) -> bool {
        matches!(self, BlockKind::Attention | BlockKind::MambaAttention)
    }

    /// One letter per kind, as in Nemotron-H's `hybrid_override_pattern` (`M`, `*`, `-`, `E`), with
    /// `P` for the parallel Mamba + attention block.
    pub fn letter(self) -> char {
        match self {
            BlockKind::Mamba => 'M',
            BlockKind::Attention => '*',
            BlockKind::MambaAttention => 'P',
            BlockKind::Mlp => '-',
            BlockKind::Moe => 'E',
        }
    }
}

/// One residual block: its kind and the checkpoint layer it belongs to (Granite, Falcon-H1 and
/// Bamba layers hold two blocks: the mixer and the MLP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BlockSpec {
    pub kind: BlockKind,
    /// Index of the checkpoint layer (`layers.{layer}.…`).
    pub layer: usize,
}

/// Rotary position embedding of the attention blocks.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RopeConfig {
    /// Base of the inverse frequencies (`rope_theta`).
    pub theta: f64,
    /// Channels rotated at the start of each head (`head_dim * partial_rotary_factor`).
    pub rotary_dim: usize,
}

/// Attention block settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AttentionConfig {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplier of q·k: `head_dim^-0.5`, or Granite's `attention_multiplier`.
    pub scale: f64,
    /// `None`: no position embedding (NoPE).
    pub rope: Option<RopeConfig>,
    /// Bias on q/k/v/o projections.
    pub bias: bool,
}

/// Activation of the MLP blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum MlpActivation {
    /// `down(silu(gate(x)) * up(x))` (Granite, Falcon-H1, Bamba).
    SwiGlu,
    /// `down(relu(up(x))²)` (Nemotron-H).
    ReluSquared,
}

/// MLP block settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MlpConfig {
    pub intermediate_size: usize,
    pub activation: MlpActivation,
    pub bias: bool,
}

/// Scalar multipliers of the µP-style families. Every one is 1 for Mamba-2. The ones inside a
/// linear map are folded into its weights at load (exact in real arithmetic); the embedding and
/// logits multipliers are applied at run time because the two matrices may be tied.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Multipliers {
    /// Embedding output (Granite `embedding_multiplier`, Falcon-H1 `embedding_multiplier`).
    pub embedding: f64,
    /// Logits (Falcon-H1 `lm_head_multiplier`, Granite `1 / logits_scaling`).
    pub logits: f64,
    /// Every block's output before the residual add (Granite `residual_multiplier`):
    /// folded into `out_proj`, `o_proj` and the MLP's down projection.
    pub residual: f64,
    /// Attention input (Falcon-H1 `attention_in_multiplier`): folded into q/k/v weights.
    pub attention_in: f64,
    /// Attention output (Falcon-H1 `attention_out_multiplier`): folded into `o_proj`.
    pub attention_out: f64,
    /// Keys (Falcon-H1 `key_multiplier`): folded into `k_proj`.
    pub key: f64,
    /// Mamba input (Falcon-H1 `ssm_in_multiplier`): folded into `in_proj`'s weight.
    pub ssm_in: f64,
    /// Mamba output (Falcon-H1 `ssm_out_multiplier`): folded into `out_proj`.
    pub ssm_out: f64,
    /// `in_proj` output slices z, x, B, C, dt (Falcon-H1 `ssm_multipliers`): folded into the
    /// rows of `in_proj`.
    pub ssm_zxbcdt: [f64; 5],
    /// MLP gate pre-activation (Falcon-H1 `mlp_multipliers[0]`): folded into the gate rows.
    pub mlp_gate: f64,
    /// MLP output (Falcon-H1 `mlp_multipliers[1]`): folded into the down projection.
    pub mlp_down: f64,
}

impl Default for Multipliers {
    fn default() -> Self {
        Self {
            embedding: 1.0,
            logits: 1.0,
            residual: 1.0,
            attention_in: 1.0,
            attention_out: 1.0,
            key: 1.0,
            ssm_in: 1.0,
            ssm_out: 1.0,
            ssm_zxbcdt: [1.0; 5],
            mlp_gate: 1.0,
            mlp_down: 1.0,
        }
    }
}

impl Multipliers {
    /// Every multiplier with its name, for validation and display.
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        let z = self.ssm_zxbcdt;
        vec![
            ("embedding_multiplier", self.embedding),
            ("logits multiplier", self.logits),
            ("residual_multiplier", self.residual),
            ("attention_in_multiplier", self.attention_in),
            ("attention_out_multiplier", self.attention_out),
            ("key_multiplier", self.key),
            ("ssm_in_multiplier", self.ssm_in),
            ("ssm_out_multiplier", self.ssm_out),
            ("ssm_multipliers[0]", z[0]),
            ("ssm_multipliers[1]", z[1]),
            ("ssm_multipliers[2]", z[2]),
            ("ssm_multipliers[3]", z[3]),
            ("ssm_multipliers[4]", z[4]),
            ("mlp_multipliers[0]", self.mlp_gate),
            ("mlp_multipliers[1]", self.mlp_down),
        ]
    }
}

/// The block list of a layer pattern string (`M`, `*`, `-`, one letter per layer), as Nemotron-H's
/// `hybrid_override_pattern` writes it (`E`: mixture of experts).
pub(crate) fn blocks_from_pattern(pattern: &str) -> std::result::Result<Vec<BlockSpec>, String> {
    pattern
        .chars()
        .enumerate()
        .map(|(layer, c)| {
            let kind = match c {
                'M' => BlockKind::Mamba,
                '*' => BlockKind::Attention,
                '-' => BlockKind::Mlp,
                'E' => BlockKind::Moe,
                other => {
                    return Err(format!(
                        "unknown block letter `{other}` at layer {layer} (expected M, *, - or E)"
                    ))
                }
            };
            Ok(BlockSpec { kind, layer })
        })
        .collect()
}
