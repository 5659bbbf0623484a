//! The block kinds of the model graph, each written against the op API only: the Mamba-2 mixer,
//! causal self-attention and the MLP. Every block maps a normed `(batch, seqlen, d_model)` input
//! to the output that is added to the residual stream; in a decode step `seqlen` is 1.

use super::matrix::Proj;
use crate::cache::{BlockState, KvCache, LayerCache};
use crate::config::{AttentionConfig, Mamba2Config, MlpActivation};
use crate::Result;
use candle_core::{Tensor, D};
use mamba2_ops::{
    causal_attention, causal_conv1d, causal_conv1d_update, gated_rms_norm, mixer_decode_step,
    mixer_decode_step_out, relu_squared, rotary_embedding, selective_state_update, ssd_chunk_scan,
    swiglu, AttentionArgs, Conv1dArgs, DecodeStepArgs, GatedRmsNormArgs, RotaryArgs, SsdArgs,
    SsdParams, StateUpdateArgs,
};

/// Whether a block runs over a whole sequence (chunked scan) or one token per row (decode step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    Prefill,
    Step,
}

/// A projection `x · wᵀ (+ bias)`, `x` `(..., in)`: a dense weight through the `linear` op (on
/// CPU its streaming / tiled / GEMM kernels with f32 accumulation, on CUDA a matrix-vector kernel
/// for decode rows and cuBLAS beyond, on Metal a matrix-vector kernel for up to 8 rows and
/// Candle's matmul beyond), a block-quantized one through
/// `quantized_linear`.
pub(crate) fn project(x: &Tensor, l: &Proj) -> Result<Tensor> {
    l.forward(x)
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// The Mamba-2 mixer: in_proj -> causal conv1d -> SSD -> gated RMSNorm -> out_proj.
#[derive(Debug, Clone)]
pub(crate) struct MambaMixer {
    pub in_proj: Proj,
    pub conv_weight: Tensor,       // (conv_dim, d_conv) f32
    pub conv_bias: Option<Tensor>, // (conv_dim) f32
    pub dt_bias: Tensor,           // (nheads) f32
    pub a: Tensor,                 // (nheads) f32, -exp(A_log)
    pub d: Tensor,                 // (nheads) f32
    /// `(d_inner)` f32; `None`: the output is `y * silu(z)` with no norm (Falcon-H1 option).
    pub norm_weight: Option<Tensor>,
    pub out_proj: Proj,
}

/// `z`, `xBC` and `dt` of a projection `(..., d_in_proj)` as views of it.
pub(crate) fn projection_views(
    c: &Mamba2Config,
    zxbcdt: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let last = zxbcdt.rank() - 1;
    let z = zxbcdt.narrow(last, 0, c.d_inner)?;
    let xbc = zxbcdt.narrow(last, c.d_inner, c.conv_dim())?;
    let dt = zxbcdt.narrow(last, c.d_inner + c.conv_dim(), c.nheads)?;
    Ok((z, xbc, dt))
}

impl MambaMixer {
    /// Arguments of the fused decode step: the projection parts `(z, xbc, dt)` (views of one
    /// `(batch, d_in_proj)` row each) and the block's states. Only for mixers with a norm.
    pub(crate) fn decode_step_args<'a>(
        &'a self,
        c: &Mamba2Config,
        (z, xbc, dt): &'a (Tensor, Tensor, Tensor),
        state: LayerCache<'a>,
        norm_weight: &'a Tensor,
    ) -> DecodeStepArgs<'a> {
        DecodeStepArgs {
            xbc,
            dt,
            z,
            conv_state: state.conv_state,
            conv_state_next: state.conv_next,
            conv_weight: &self.conv_weight,
            conv_bias: self.conv_bias.as_ref(),
            ssm_state: state.ssm_state,
            a: &self.a,
            d: Some(&self.d),
            dt_bias: Some(&self.dt_bias),
            norm_weight,
            eps: c.norm_eps,
            ngroups: c.ngroups,
            norm_before_gate: c.norm_before_gate,
        }
    }

    pub(crate) fn forward(
        &self,
        c: &Mamba2Config,
        params: &SsdParams,
        u: &Tensor, // (batch, seqlen, d_model)
        state: Option<LayerCache<'_>>,
        pass: Pass,
    ) -> Result<Tensor> {
        match (pass, state) {
            (Pass::Step, Some(state)) => self.step(c, params, u, state),
            (_, state) => self.prefill(c, params, u, state),
        }
    }

    fn prefill(
        &self,
        c: &Mamba2Config,
        params: &SsdParams,
        u: &Tensor,
        cache: Option<LayerCache<'_>>,
    ) -> Result<Tensor> {
        let (batch, seqlen, _) = u.dims3()?;
        let zxbcdt = project(u, &self.in_proj)?; // (batch, seqlen, d_in_proj)
        let (z, xbc, dt) = projection_views(c, &zxbcdt)?;
        let (xbc, dt, z) = (xbc.contiguous()?, dt.contiguous()?, z.contiguous()?);
        let (xbc, new_conv) = causal_conv1d(&Conv1dArgs {
            x: &xbc,
            weight: &self.conv_weight,
            bias: self.conv_bias.as_ref(),
            initial_state: cache.as_ref().map(|lc| lc.conv_state),
            seq_idx: None,
            silu: true,
        })?; // (batch, seqlen, conv_dim)
        let gn = c.ngroups * c.d_state;
        let x = xbc
            .narrow(2, 0, c.d_inner)?
            .reshape((batch, seqlen, c.nheads, c.headdim))?;
        let b = xbc
            .narrow(2, c.d_inner, gn)?
            .reshape((batch, seqlen, c.ngroups, c.d_state))?;
        let cm = xbc
            .narrow(2, c.d_inner + gn, gn)?
            .reshape((batch, seqlen, c.ngroups, c.d_state))?;
        // Without a norm the gate is applied by the scan itself: y * silu(z).
        let z_heads = match self.norm_weight {
            None => Some(z.reshape((batch, seqlen, c.nheads, c.headdim))?),
            Some(_) => None,
        };
        let (y, new_ssm) = ssd_chunk_scan(
            &SsdArgs {
                x: &x,
                dt: &dt,
                a: &self.a,
                b: &b,
                c: &cm,
                d: Some(&self.d),
                z: z_heads.as_ref(),
                dt_bias: Some(&self.dt_bias),
                initial_state: cache.as_ref().map(|lc| lc.ssm_state),
                seq_idx: None,
            },
            params,
        )?; // (batch, seqlen, nheads, headdim)
        if let Some(lc) = cache {
            lc.conv_state.slice_set(&new_conv, 0, 0)?;
            lc.ssm_state.slice_set(&new_ssm, 0, 0)?;
        }
        let y = y.reshape((batch, seqlen, c.d_inner))?;
        let y = match &self.norm_weight {
            Some(w) => gated_rms_norm(&GatedRmsNormArgs {
                x: &y,
                z: Some(&z),
                weight: w,
                eps: c.norm_eps,
                group_size: c.d_inner / c.ngroups,
                norm_before_gate: c.norm_before_gate,
            })?,
            None => y,
        }; // (batch, seqlen, d_inner)
        project(&y, &self.out_proj)
    }

    /// One token per row through the fused decode-step op (one launch on CUDA; the composition
    /// of the unfused ops elsewhere).
    fn step(
        &self,
        c: &Mamba2Config,
        params: &SsdParams,
        u: &Tensor, // (batch, 1, d_model)
        state: LayerCache<'_>,
    ) -> Result<Tensor> {
        let zxbcdt = project(&u.squeeze(1)?, &self.in_proj)?; // (batch, d_in_proj)
                                                              // z, xBC, dt: (batch, d_inner), (batch, conv_dim), (batch, nheads) views of zxbcdt
        let parts = projection_views(c, &zxbcdt)?;
        let out = match (&self.norm_weight, self.out_proj.weight.dense()) {
            // the out-projection in the op: on Metal it folds the gated norm in
            (Some(w), Some(w_out)) => {
                let args = self.decode_step_args(c, &parts, state, w);
                mixer_decode_step_out(&args, params, w_out, self.out_proj.bias.as_ref())?
            }
            (Some(w), None) => {
                let args = self.decode_step_args(c, &parts, state, w);
                project(&mixer_decode_step(&args, params)?, &self.out_proj)?
            }
            (None, _) => project(
                &self.step_ungated_norm(c, params, &parts, state)?,
                &self.out_proj,
            )?,
        }; // (batch, d_model)
        Ok(out.unsqueeze(1)?)
    }

    /// The step of a mixer without a norm: conv update, then the state update with the gate.
    fn step_ungated_norm(
        &self,
        c: &Mamba2Config,
        params: &SsdParams,
        (z, xbc, dt): &(Tensor, Tensor, Tensor),
        state: LayerCache<'_>,
    ) -> Result<Tensor> {
        let batch = xbc.dim(0)?;
        // the state goes to the second buffer when the cache has one, as in the fused step
        let conv_state = match state.conv_next {
            Some(next) => {
                next.slice_set(state.conv_state, 0, 0)?;
                next
            }
            None => state.conv_state,
        };
        let xbc = causal_conv1d_update(
            &xbc.contiguous()?,
            conv_state,
            &self.conv_weight,
            self.conv_bias.as_ref(),
            true,
        )?; // (batch, conv_dim)
        let gn = c.ngroups * c.d_state;
        let heads = (batch, c.nheads, c.headdim);
        let x = xbc.narrow(1, 0, c.d_inner)?.reshape(heads)?;
        let b = xbc
            .narrow(1, c.d_inner, gn)?
            .reshape((batch, c.ngroups, c.d_state))?;
        let cm = xbc
            .narrow(1, c.d_inner + gn, gn)?
            .reshape((batch, c.ngroups, c.d_state))?;
        let z = z.contiguous()?.reshape(heads)?;
        let y = selective_state_update(
            &StateUpdateArgs {
                state: state.ssm_state,
                x: &x,
                dt: &dt.contiguous()?,
                a: &self.a,
                b: &b,
                c: &cm,
                d: Some(&self.d),
                z: Some(&z),
                dt_bias: Some(&self.dt_bias),
            },
            params,
        )?; // (batch, nheads, headdim)
        Ok(y.reshape((batch, c.d_inner))?)
    }
}

/// Causal self-attention with fused q/k/v projection rows `[q | k | v]`.
#[derive(Debug, Clone)]
pub(crate) struct Attention {
    pub qkv: Proj,
    pub o_proj: Proj,
}

impl Attention {
    pub(crate) fn forward(
        &self,
        a: &AttentionConfig,
        x: &Tensor, // (batch, seqlen, d_model)
        kv: Option<&mut KvCache>,
        position_offset: usize,
    ) -> Result<Tensor> {
        let (batch, seqlen, _) = x.dims3()?;
        let (nh, kvh, hd) = (a.num_heads, a.num_kv_heads, a.head_dim);
        let qkv = project(x, &self.qkv)?; // (batch, seqlen, (nh + 2 kvh) hd)
        let q = qkv
            .narrow(D::Minus1, 0, nh * hd)?
            .reshape((batch, seqlen, nh, hd))?;
        let k = qkv
            .narrow(D::Minus1, nh * hd, kvh * hd)?
            .reshape((batch, seqlen, kvh, hd))?;
        let v = qkv
            .narrow(D::Minus1, (nh + kvh) * hd, kvh * hd)?
            .reshape((batch, seqlen, kvh, hd))?;
        let (q, k) = match a.rope {
            Some(r) => {
                let rope = |t: &Tensor| {
                    rotary_embedding(&RotaryArgs {
                        x: t,
                        position_offset,
                        rotary_dim: r.rotary_dim,
                        theta: r.theta,
                    })
                };
                (rope(&q)?, rope(&k)?)
            }
            None => (q, k),
        };
        let (k_all, v_all) = match kv {
            Some(cache) => cache.append(&k, &v)?,
            None => (k, v),
        }; // (batch, kv_len, kvh, hd)
        let o = causal_attention(&AttentionArgs {
            q: &q,
            k: &k_all,
            v: &v_all,
            scale: a.scale,
        })?; // (batch, seqlen, nh, hd)
        project(&o.reshape((batch, seqlen, nh * hd))?, &self.o_proj)
    }
}

/// The feed-forward block: one up projection (`[gate | up]` rows for SwiGLU), the activation,
/// the down projection.
#[derive(Debug, Clone)]
pub(crate) struct Mlp {
    pub up: Proj,
    pub down: Proj,
    pub activation: MlpActivation,
}

impl Mlp {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = project(x, &self.up)?; // (..., 2 I) or (..., I)
        let h = match self.activation {
            MlpActivation::SwiGlu => swiglu(&h)?,
            MlpActivation::ReluSquared => relu_squared(&h)?,
        }; // (..., I)
        project(&h, &self.down)
    }
}

/// What a block computes between its norm and the residual add.
#[derive(Debug, Clone)]
pub(crate) enum Mixer {
    Mamba(MambaMixer),
    Attention(Attention),
    /// Falcon-H1: both on the same input, outputs summed.
    MambaAttention(MambaMixer, Attention),
    Mlp(Mlp),
    /// Routed experts plus the shared MLP (Granite-4.0-H MoE, Nemotron-H `E`).
    Moe(super::moe::MoeBlock),
}

impl MambaMixer {
    /// The small per-channel tensors: conv, dt bias, A, D, gated-norm weight.
    fn small_tensors(&self) -> impl Iterator<Item = &Tensor> {
        [&self.conv_weight, &self.dt_bias, &self.a, &self.d]
            .into_iter()
            .chain(self.conv_bias.as_ref())
            .chain(self.norm_weight.as_ref())
    }

    fn num_parameters(&self) -> usize {
        self.in_proj.num_parameters()
            + self.small_tensors().map(|t| t.elem_count()).sum::<usize>()
            + self.out_proj.num_parameters()
    }

    fn storage_bytes(&self) -> usize {
        self.in_proj.storage_bytes()
            + self.small_tensors().map(tensor_bytes).sum::<usize>()
            + self.out_proj.storage_bytes()
    }

    /// Whether both projections are dense (the captured CUDA step reads dense weights only).
    pub(crate) fn dense_projections(&self) -> bool {
        self.in_proj.weight.dense().is_some() && self.out_proj.weight.dense().is_some()
    }
}

impl Mixer {
    /// Parameters of the block's mixer (fused projections counted as their parts).
    pub(crate) fn num_parameters(&self) -> usize {
        let attn = |a: &Attention| a.qkv.num_parameters() + a.o_proj.num_parameters();
        match self {
            Mixer::Mamba(m) => m.num_parameters(),
            Mixer::Attention(a) => attn(a),
            Mixer::MambaAttention(m, a) => m.num_parameters() + attn(a),
            Mixer::Mlp(m) => m.up.num_parameters() + m.down.num_parameters(),
            Mixer::Moe(m) => {
                m.tensors().map(|t| t.elem_count()).sum::<usize>()
                    + m.experts_ggml_dtype().map_or(0, |_| m.routed_parameters())
                    + m.shared.up.num_parameters()
                    + m.shared.down.num_parameters()
            }
        }
    }

    /// The block format of the first block-quantized projection, if any.
    pub(crate) fn first_ggml_dtype(&self) -> Option<candle_core::quantized::GgmlDType> {
        let projs: Vec<&Proj> = match self {
            Mixer::Mamba(m) => vec![&m.in_proj, &m.out_proj],
            Mixer::Attention(a) => vec![&a.qkv, &a.o_proj],
            Mixer::MambaAttention(m, a) => vec![&m.in_proj, &m.out_proj, &a.qkv, &a.o_proj],
            Mixer::Mlp(m) => vec![&m.up, &m.down],
            Mixer::Moe(m) => {
                if let Some(ty) = m.experts_ggml_dtype() {
                    return Some(ty);
                }
                vec![&m.shared.up, &m.shared.down]
            }
        };
        projs.iter().find_map(|p| p.weight.ggml_dtype())
    }

    /// Bytes of the block's mixer weights as stored (quantized matrices at their block size).
    pub(crate) fn storage_bytes(&self) -> usize {
        let attn = |a: &Attention| a.qkv.storage_bytes() + a.o_proj.storage_bytes();
        match self {
            Mixer::Mamba(m) => m.storage_bytes(),
            Mixer::Attention(a) => attn(a),
            Mixer::MambaAttention(m, a) => m.storage_bytes() + attn(a),
            Mixer::Mlp(m) => m.up.storage_bytes() + m.down.storage_bytes(),
            Mixer::Moe(m) => {
                m.tensors().map(tensor_bytes).sum::<usize>()
                    + m.experts_ggml_dtype().map_or(0, |_| m.routed_bytes())
                    + m.shared.up.storage_bytes()
                    + m.shared.down.storage_bytes()
            }
        }
    }

    /// Parameters one token computes with: all of them, except that a MoE block counts only
    /// `top_k` of its `n_experts` routed experts.
    pub(crate) fn active_parameters(&self) -> usize {
        match self {
            Mixer::Moe(m) => {
                self.num_parameters() - m.routed_parameters() + m.per_token(m.routed_parameters())
            }
            _ => self.num_parameters(),
        }
    }

    /// Bytes of weights one decode step of one sequence reads, as stored: all of them, except
    /// that a MoE block reads the rows of `top_k` of its `n_experts` routed experts.
    pub(crate) fn active_storage_bytes(&self) -> usize {
        match self {
            Mixer::Moe(m) => {
                self.storage_bytes() - m.routed_bytes() + m.per_token(m.routed_bytes())
            }
            _ => self.storage_bytes(),
        }
    }

    /// The mixer's dense weight tensors by role (block-quantized matrices left out).
    pub(crate) fn dense_tensors(&self) -> Vec<(&'static str, Tensor)> {
        fn proj(out: &mut Vec<(&'static str, Tensor)>, name: &'static str, p: &Proj) {
            out.extend(p.weight.dense().map(|t| (name, t.clone())));
            out.extend(p.bias.as_ref().map(|t| (name, t.clone())));
        }
        let mut out = Vec::new();
        let mamba = |out: &mut Vec<_>, m: &MambaMixer| {
            proj(out, "in_proj", &m.in_proj);
            proj(out, "out_proj", &m.out_proj);
            out.extend(m.small_tensors().map(|t| ("mamba_small", t.clone())));
        };
        let attn = |out: &mut Vec<_>, a: &Attention| {
            proj(out, "qkv", &a.qkv);
            proj(out, "o_proj", &a.o_proj);
        };
        match self {
            Mixer::Mamba(m) => mamba(&mut out, m),
            Mixer::Attention(a) => attn(&mut out, a),
            Mixer::MambaAttention(m, a) => {
                mamba(&mut out, m);
                attn(&mut out, a);
            }
            Mixer::Mlp(m) => {
                proj(&mut out, "mlp_up", &m.up);
                proj(&mut out, "mlp_down", &m.down);
            }
            Mixer::Moe(m) => {
                out.push(("router", m.router.clone()));
                out.extend(m.correction_bias.iter().map(|t| ("router", t.clone())));
                if let super::moe::RoutedExperts::Dense { up, down } = &m.experts {
                    out.push(("experts.up", up.clone()));
                    out.push(("experts.down", down.clone()));
                }
                proj(&mut out, "shared_up", &m.shared.up);
                proj(&mut out, "shared_down", &m.shared.down);
            }
        }
        out
    }
}

/// One residual block: RMSNorm weight, mixer, and its state slots in the cache.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub norm_weight: Tensor, // (d_model)
    pub mixer: Mixer,
    /// Index of the block's SSM state / KV cache in the cache, when it has one.
    pub ssm_slot: Option<usize>,
    pub kv_slot: Option<usize>,
}

/// Everything a block needs besides its weights and state.
pub(crate) struct BlockCtx<'a> {
    pub config: &'a Mamba2Config,
    pub ssd_params: &'a SsdParams,
    pub pass: Pass,
    pub position_offset: usize,
}

impl Block {
    pub(crate) fn forward(
        &self,
        ctx: &BlockCtx<'_>,
        x: &Tensor,
        state: Option<BlockState<'_>>,
    ) -> Result<Tensor> {
        let (ssm, kv) = match state {
            Some(s) => (s.ssm, s.kv),
            None => (None, None),
        };
        let c = ctx.config;
        let attention_config = || {
            c.attention
                .as_ref()
                .ok_or_else(|| crate::Error::Unsupported("attention block without settings".into()))
        };
        match &self.mixer {
            Mixer::Mamba(m) => m.forward(c, ctx.ssd_params, x, ssm, ctx.pass),
            Mixer::Attention(a) => a.forward(attention_config()?, x, kv, ctx.position_offset),
            Mixer::MambaAttention(m, a) => {
                let y = m.forward(c, ctx.ssd_params, x, ssm, ctx.pass)?;
                let o = a.forward(attention_config()?, x, kv, ctx.position_offset)?;
                Ok((y + o)?)
            }
            Mixer::Mlp(mlp) => mlp.forward(x),
            Mixer::Moe(moe) => moe.forward(x),
        }
    }
}
