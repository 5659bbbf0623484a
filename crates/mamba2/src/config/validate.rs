//! Consistency checks of the hybrid families' configs (the Mamba-2 checks are in `validate`).

use super::blocks::Family;
use super::{Mamba2Config, MAX_DIM};
use crate::error::{Error, Result};

fn size(field: &str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(Error::field(field, "must be at least 1, got 0"));
    }
    if v > MAX_DIM {
        return Err(Error::field(
            field,
            format!("{v} is larger than the supported maximum {MAX_DIM}"),
        ));
    }
    Ok(())
}

impl Mamba2Config {
    pub(super) fn validate_hybrid(&self) -> Result<()> {
        let blocks = self.blocks();
        if blocks.is_empty() {
            return Err(Error::field(
                self.field_name("n_layer"),
                "the model has no layers",
            ));
        }
        if let Some(b) = blocks.iter().find(|b| b.layer >= self.n_layer) {
            return Err(Error::field(
                self.field_name("n_layer"),
                format!(
                    "block of layer {} past the {} layers",
                    b.layer, self.n_layer
                ),
            ));
        }
        if self.d_inner != self.nheads * self.headdim {
            let field = match self.family {
                Family::FalconH1 => "mamba_d_ssm",
                _ => self.hybrid_field_name("headdim").unwrap_or("headdim"),
            };
            return Err(Error::field(
                field,
                format!(
                    "the Mamba inner width {} must equal heads * head dim = {} * {}",
                    self.d_inner, self.nheads, self.headdim
                ),
            ));
        }
        if blocks.iter().any(|b| b.kind.has_kv()) {
            let Some(a) = &self.attention else {
                return Err(Error::field(
                    "num_attention_heads",
                    "attention blocks need attention settings",
                ));
            };
            size("num_attention_heads", a.num_heads)?;
            size("num_key_value_heads", a.num_kv_heads)?;
            size("head_dim", a.head_dim)?;
            if !a.num_heads.is_multiple_of(a.num_kv_heads) {
                return Err(Error::field(
                    "num_key_value_heads",
                    format!(
                        "{} key/value heads must divide the {} attention heads",
                        a.num_kv_heads, a.num_heads
                    ),
                ));
            }
            if !(a.scale.is_finite() && a.scale > 0.0) {
                let field = match self.family {
                    Family::GraniteHybrid => "attention_multiplier",
                    _ => "head_dim",
                };
                return Err(Error::field(
                    field,
                    format!("attention scale {} must be finite and > 0", a.scale),
                ));
            }
            if let Some(r) = a.rope {
                if r.rotary_dim == 0 || !r.rotary_dim.is_multiple_of(2) || r.rotary_dim > a.head_dim
                {
                    return Err(Error::field(
                        "partial_rotary_factor",
                        format!(
                            "rotates {} channels of a {}-channel head; must be even, > 0 and <= head_dim",
                            r.rotary_dim, a.head_dim
                        ),
                    ));
                }
            }
        }
        if blocks.iter().any(|b| b.kind == super::BlockKind::Mlp) {
            let Some(m) = &self.mlp else {
                return Err(Error::field(
                    "intermediate_size",
                    "MLP blocks need MLP settings",
                ));
            };
            let field = match self.family {
                Family::GraniteHybrid => "shared_intermediate_size",
                _ => "intermediate_size",
            };
            size(field, m.intermediate_size)?;
        }
        if blocks.iter().any(|b| b.kind == super::BlockKind::Moe) {
            let Some(moe) = &self.moe else {
                return Err(Error::field(
                    "num_experts_per_tok",
                    "mixture-of-experts blocks need MoE settings",
                ));
            };
            moe.validate(MAX_DIM)?;
        }
        for (name, v) in self.multipliers.named() {
            if !v.is_finite() {
                return Err(Error::field(name, format!("must be finite, got {v}")));
            }
        }
        Ok(())
    }
}
