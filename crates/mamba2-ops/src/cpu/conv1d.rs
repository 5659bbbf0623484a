//! CPU causal depthwise conv1d: prefill, one-token update in place, varlen state extraction.
//!
//! Reference: [`crate::conv1d::causal_conv1d_slow`] and friends. Shapes: x `(batch, seqlen,
//! channels)`, weight `(channels, d_conv)`, state `(batch, channels, d_conv)` f32, oldest first.
//!
//! Prefill splits (batch, block of `ROWS` tokens) over rayon tasks. Each task converts the
//! `ROWS + d_conv - 1` input rows it needs to f32 once, then for each output row accumulates the
//! `d_conv` taps channel-wise (the inner loop runs over contiguous channels and vectorizes) with
//! the weight transposed to `(d_conv, channels)`.

use super::common::{overlaps, run_ids, silu_f32, view, view_opt, with_scratch, OutVec, View};
use crate::conv1d::Conv1dArgs;
use crate::options::{current_options, CpuTier};
use crate::Result;
use candle_core::{CpuStorage, InplaceOp1, Layout, Tensor};
use rayon::prelude::*;

/// Output rows per task.
const ROWS: usize = 64;

/// The filter as `(d_conv, channels)` f32 and the bias as f32: small, built once per call.
fn taps(w: &View, bias: Option<&View>, channels: usize, d_conv: usize) -> (Vec<f32>, Vec<f32>) {
    let mut wt = vec![0f32; d_conv * channels];
    for ch in 0..channels {
        for k in 0..d_conv {
            wt[k * channels + ch] = w.get([0, 0, ch, k]);
        }
    }
    let b = (0..channels)
        .map(|ch| bias.map_or(0.0, |b| b.get([0, 0, 0, ch])))
        .collect();
    (wt, b)
}

pub(crate) fn causal_conv1d(args: &Conv1dArgs) -> Result<Option<(Tensor, Tensor)>> {
    let [batch, seqlen, channels] = args.x.dims3()?.into();
    let d_conv = args.weight.dim(1)?;
    view!(x = args.x);
    view!(w = args.weight);
    view_opt!(bias = args.bias);
    view_opt!(init = args.initial_state);
    let runs = run_ids(args.seq_idx)?;
    let Some(mut y_out) = OutVec::new(args.x.dtype(), batch * seqlen * channels) else {
        return Ok(None);
    };
    let y_ptr = y_out.writer();
    let (wt, bias) = taps(&w, bias.as_ref(), channels, d_conv);
    let hist = d_conv - 1;
    let blocks = seqlen.div_ceil(ROWS);
    let runs = runs.as_ref();

    (0..batch * blocks).into_par_iter().for_each_init(
        || (vec![0f32; (ROWS + hist) * channels], vec![0f32; channels]),
        |(xin, acc), task| {
            let (bi, blk) = (task / blocks, task % blocks);
            let t0 = blk * ROWS;
            let rows = ROWS.min(seqlen - t0);
            let run = |t: usize| runs.map_or(0, |r| r[bi][t]);
            // Input row `t0 - hist + r` goes to xin row r; rows before the sequence come from the
            // initial state (its newest `hist` entries) or are zero.
            for r in 0..rows + hist {
                let dst = &mut xin[r * channels..(r + 1) * channels];
                let src_t = (t0 + r) as isize - hist as isize;
                if src_t >= 0 {
                    x.load(x.at([0, bi, src_t as usize, 0]), dst);
                } else if let Some(init) = &init {
                    let k = (d_conv as isize + src_t) as usize;
                    for (ch, v) in dst.iter_mut().enumerate() {
                        *v = init.get([0, bi, ch, k]);
                    }
                } else {
                    dst.iter_mut().for_each(|v| *v = 0.0);
                }
            }
            for r in 0..rows {
                let t = t0 + r;
                acc.copy_from_slice(&bias);
                for k in 0..d_conv {
                    let src_t = t as isize - hist as isize + k as isize;
                    if runs.is_some() {
                        // Taps reaching into another run read nothing; before the sequence they
                        // read the initial state only from the first run.
                        let same = if src_t >= 0 {
                            run(src_t as usize) == run(t)
                        } else {
                            run(t) == run(0)
                        };
                        if !same {
                            continue;
                        }
                    }
                    let xr = &xin[(r + k) * channels..(r + k + 1) * channels];
                    let wr = &wt[k * channels..(k + 1) * channels];
                    for ((a, &xv), &wv) in acc.iter_mut().zip(xr).zip(wr) {
                        *a += xv * wv;
                    }
                }
                if args.silu {
                    acc.iter_mut().for_each(|v| *v = silu_f32(*v));
                }
                // SAFETY: row (bi, t) belongs to this task only.
                unsafe { y_ptr.store((bi * seqlen + t) * channels, acc) };
            }
        },
    );

    // Final state: the newest d_conv inputs of the last run (the initial state counts only when
    // the last run is the first one).
    let mut fin = vec![0f32; batch * channels * d_conv];
    fin.par_chunks_mut(channels * d_conv)
        .enumerate()
        .for_each(|(bi, st)| {
            let last = run(runs, bi, seqlen - 1);
            let mut row = vec![0f32; channels];
            for j in 0..d_conv {
                let src_t = seqlen as isize - d_conv as isize + j as isize;
                if src_t >= 0 {
                    if run(runs, bi, src_t as usize) != last {
                        continue;
                    }
                    x.load(x.at([0, bi, src_t as usize, 0]), &mut row);
                    for (ch, &v) in row.iter().enumerate() {
                        st[ch * d_conv + j] = v;
                    }
                } else if let (Some(init), true) = (&init, last == run(runs, bi, 0)) {
                    let k = (d_conv as isize + src_t) as usize;
                    for ch in 0..channels {
                        st[ch * d_conv + j] = init.get([0, bi, ch, k]);
                    }
                }
            }
        });
    let y = y_out.into_tensor(&[batch, seqlen, channels])?;
    let fin = Tensor::from_vec(fin, (batch, channels, d_conv), &candle_core::Device::Cpu)?;
    Ok(Some((y, fin)))
}

fn run(runs: Option<&Vec<Vec<u32>>>, bi: usize, t: usize) -> u32 {
    runs.map_or(0, |r| r[bi][t])
}

/// One decode step on the conv state, in place: the state is shifted left by one, `x` appended,
/// and the output computed from the shifted state, all in one pass over the state.
struct ConvUpdate<'a> {
    x: View<'a>,
    w: View<'a>,
    bias: Option<View<'a>>,
    silu: bool,
    batch: usize,
    channels: usize,
    d_conv: usize,
    tier: CpuTier,
    out: std::cell::RefCell<OutVec>,
}

impl InplaceOp1 for ConvUpdate<'_> {
    fn name(&self) -> &'static str {
        "causal_conv1d_update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(buf) = storage else {
            candle_core::bail!("causal_conv1d_update: conv_state must be f32");
        };
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("conv_state must be contiguous".into()))?;
        let state = &mut buf[start..end];
        let (c, k) = (self.channels, self.d_conv);
        let mut out = self.out.borrow_mut();
        let writer = out.writer();
        // Scratch: x row, y row, and (unless they are f32 and contiguous already) the weights and
        // bias as f32, converted in bulk.
        let w_direct = if self.w.is_contiguous_from(2, &[c, k]) {
            self.w.f32_slice(self.w.at([0; 4]), c * k)
        } else {
            None
        };
        with_scratch(3 * c + c * k, |buf| {
            let (xrow, rest) = buf.split_at_mut(c);
            let (yrow, rest) = rest.split_at_mut(c);
            let (brow, wbuf) = rest.split_at_mut(c);
            match &self.bias {
                Some(b) => b.load(b.at([0; 4]), brow),
                None => brow.iter_mut().for_each(|v| *v = 0.0),
            }
            let w: &[f32] = match w_direct {
                Some(w) => w,
                // A contiguous 16-bit weight (the usual case) converts in one bulk call; per
                // channel, the 4-element loads cost more than the whole convolution.
                None if self.w.is_contiguous_from(2, &[c, k]) => {
                    self.w.load(self.w.at([0; 4]), &mut wbuf[..c * k]);
                    wbuf
                }
                None => {
                    for ch in 0..c {
                        self.w
                            .load(self.w.at([0, 0, ch, 0]), &mut wbuf[ch * k..(ch + 1) * k]);
                    }
                    wbuf
                }
            };
            for bi in 0..self.batch {
                self.x.load(self.x.at([0, 0, bi, 0]), xrow);
                let st = &mut state[bi * c * k..(bi + 1) * c * k];
                if k == 4 {
                    // The released models' width.
                    update_width4(self.tier, st, &w[..c * 4], (xrow, brow), yrow);
                    // SiLU in its own pass over the contiguous row, so that its exp vectorizes.
                    if self.silu {
                        silu_row(self.tier, yrow);
                    }
                } else {
                    update_any_width(self.tier, st, &w[..c * k], (xrow, brow), yrow, self.silu);
                }
                // SAFETY: single-threaded, row bi written once.
                unsafe { writer.store(bi * c, yrow) };
            }
        });
        Ok(())
    }
}

pub(crate) fn causal_conv1d_update(
    x: &Tensor,
    conv_state: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    silu: bool,
) -> Result<Option<Tensor>> {
    let (batch, channels) = x.dims2()?;
    let d_conv = weight.dim(1)?;
    let state_range = {
        let (g, l) = conv_state.storage_and_layout();
        match View::new(&g, l) {
            Some(v) => v.addr_range(),
            None => return Ok(None),
        }
    };
    view!(xv = x);
    view!(wv = weight);
    view_opt!(bv = bias);
    // Holding read guards of an input that shares the state's storage would deadlock the write
    // lock below; such a call goes to the reference.
    let inputs = [Some(&xv), Some(&wv), bv.as_ref()];
    if inputs
        .iter()
        .flatten()
        .any(|v| overlaps(&v.addr_range(), &state_range))
    {
        return Ok(None);
    }
    let Some(out) = OutVec::new(x.dtype(), batch * channels) else {
        return Ok(None);
    };
    let tier = current_options().cpu.effective_tier();
    let op = ConvUpdate {
        x: xv,
        w: wv,
        bias: bv,
        silu,
        batch,
        channels,
        d_conv,
        tier,
        out: std::cell::RefCell::new(out),
    };
    conv_state.inplace_op1(&op)?;
    super::record_tier("causal_conv1d_update", tier);
    Ok(Some(op.out.into_inner().into_tensor(&[batch, channels])?))
}

pub(crate) fn conv_states_varlen(
    x: &Tensor,
    cu_seqlens: &[usize],
    d_conv: usize,
) -> Result<Option<Tensor>> {
    let channels = x.dim(1)?;
    view!(xv = x);
    let nseq = cu_seqlens.len() - 1;
    let mut out = vec![0f32; nseq * channels * d_conv];
    out.par_chunks_mut(channels * d_conv)
        .enumerate()
        .for_each(|(si, st)| {
            let (start, end) = (cu_seqlens[si], cu_seqlens[si + 1]);
            let take = (end - start).min(d_conv);
            let mut row = vec![0f32; channels];
            for j in 0..take {
                let t = end - take + j;
                xv.load(xv.at([0, 0, t, 0]), &mut row);
                let k = d_conv - take + j;
                for (ch, &v) in row.iter().enumerate() {
                    st[ch * d_conv + k] = v;
                }
            }
        });
    Ok(Some(Tensor::from_vec(
        out,
        (nseq, channels, d_conv),
        &candle_core::Device::Cpu,
    )?))
}

/// `y = y · sigmoid(y)` over a row, compiled for the tier's vector width (the crate targets
/// baseline SSE2 on x86-64; NEON is aarch64's baseline): for a decode step this is one exp per
/// conv channel. Same operations on every tier, so the same results.
fn silu_row(tier: CpuTier, y: &mut [f32]) {
    match tier {
        #[cfg(target_arch = "x86_64")]
        CpuTier::Avx512 => {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512(y: &mut [f32]) {
                y.iter_mut().for_each(|v| *v = silu_f32(*v));
            }
            // SAFETY: the tier is one this CPU supports (`CpuOptions::effective_tier`).
            unsafe { avx512(y) }
        }
        #[cfg(target_arch = "x86_64")]
        CpuTier::Avx2 => {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(y: &mut [f32]) {
                y.iter_mut().for_each(|v| *v = silu_f32(*v));
            }
            // SAFETY: as above.
            unsafe { avx2(y) }
        }
        _ => y.iter_mut().for_each(|v| *v = silu_f32(*v)),
    }
}

/// The update of every channel of one sequence for a width `k` other than 4: each state row
/// `(k)` shifts left by one and takes `x`, and `y = bias + state · w` (SiLU'd when `silu`).
/// `st`, `w` `(channels, k)`; `x`, `b`, `y` `(channels)`. One body compiled for the tier's
/// instruction set (on aarch64, NEON is the baseline the portable body is compiled for).
fn update_any_width(
    tier: CpuTier,
    st: &mut [f32],
    w: &[f32],
    (x, b): (&[f32], &[f32]),
    y: &mut [f32],
    silu: bool,
) {
    type Rows<'a> = (&'a [f32], &'a [f32]);
    #[inline(always)]
    fn body(st: &mut [f32], w: &[f32], (x, b): Rows, y: &mut [f32], silu: bool) {
        let k = st.len() / y.len().max(1);
        for (ch, yv) in y.iter_mut().enumerate() {
            let s = &mut st[ch * k..(ch + 1) * k];
            s.copy_within(1.., 0);
            s[k - 1] = x[ch];
            let wr = &w[ch * k..(ch + 1) * k];
            let acc = b[ch] + s.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>();
            *yv = if silu { silu_f32(acc) } else { acc };
        }
    }
    match tier {
        #[cfg(target_arch = "x86_64")]
        CpuTier::Avx512 => {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512(st: &mut [f32], w: &[f32], xb: Rows, y: &mut [f32], silu: bool) {
                body(st, w, xb, y, silu)
            }
            // SAFETY: the tier is one this CPU supports (`CpuOptions::effective_tier`).
            unsafe { avx512(st, w, (x, b), y, silu) }
        }
        #[cfg(target_arch = "x86_64")]
        CpuTier::Avx2 => {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(st: &mut [f32], w: &[f32], xb: Rows, y: &mut [f32], silu: bool) {
                body(st, w, xb, y, silu)
            }
            // SAFETY: as above.
            unsafe { avx2(st, w, (x, b), y, silu) }
        }
        _ => body(st, w, (x, b), y, silu),
    }
}

/// The width-4 update of every channel of one sequence: each state row `(4)` shifts left by
/// one and takes `x`, and `y = bias + state · w`. `st`, `w` `(channels, 4)`; `x`, `b`, `y`
/// `(channels)`.
fn update_width4(
    tier: CpuTier,
    st: &mut [f32],
    w: &[f32],
    (x, b): (&[f32], &[f32]),
    y: &mut [f32],
) {
    #[cfg(target_arch = "aarch64")]
    if tier == CpuTier::Neon {
        // SAFETY: the tier is one this CPU supports; the kernel checks the lengths.
        return unsafe { super::neon::conv_update_width4(st, w, x, b, y) };
    }
    let _ = tier;
    // Fixed-size rows the compiler keeps in registers.
    for (((s, wr), (&xv, &bv)), y) in st
        .chunks_exact_mut(4)
        .zip(w.chunks_exact(4))
        .zip(x.iter().zip(b.iter()))
        .zip(y.iter_mut())
    {
        let (s1, s2, s3) = (s[1], s[2], s[3]);
        s[0] = s1;
        s[1] = s2;
        s[2] = s3;
        s[3] = xv;
        *y = bv + s1 * wr[0] + s2 * wr[1] + s3 * wr[2] + xv * wr[3];
    }
}
