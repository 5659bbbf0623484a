//! aarch64 NEON kernels of the decode-time loops: the selective state update's row, the
//! width-4 conv update and the RMS normalisation. The linear's tiles are in `linear/neon.rs`.
//!
//! Why explicit intrinsics although NEON is aarch64's baseline (so the portable loops are
//! vectorized too): fused multiply-adds (`fmla`, which Rust never forms on its own), four
//! independent accumulators per reduction, and a conv state row shifted in one register
//! (`ext`) instead of four scalar moves. Every function is `unsafe` only because of
//! `#[target_feature]`: callers hold the NEON tier (`CpuTier::Neon`, checked at run time);
//! slice lengths are checked here.

use std::arch::aarch64::*;

/// One SSM state row `(d_state)` of a decode step: `row = row · decay + xdt · b`, written back,
/// and returns `row · c`. `b`, `c` `(d_state)`.
///
/// # Safety
/// NEON present.
#[target_feature(enable = "neon")]
pub(super) unsafe fn state_row(row: &mut [f32], xdt: f32, decay: f32, b: &[f32], c: &[f32]) -> f32 {
    let n = row.len();
    assert!(b.len() >= n && c.len() >= n);
    let (p, bp, cp) = (row.as_mut_ptr(), b.as_ptr(), c.as_ptr());
    let (vd, vx) = (vdupq_n_f32(decay), vdupq_n_f32(xdt));
    let mut acc = [vdupq_n_f32(0.0); 4];
    let main = n - n % 16;
    let mut i = 0;
    while i < main {
        for (u, a) in acc.iter_mut().enumerate() {
            let j = i + 4 * u;
            let v = vfmaq_f32(vmulq_f32(vld1q_f32(p.add(j)), vd), vx, vld1q_f32(bp.add(j)));
            vst1q_f32(p.add(j), v);
            *a = vfmaq_f32(*a, v, vld1q_f32(cp.add(j)));
        }
        i += 16;
    }
    let mut sum = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ));
    for j in i..n {
        let v = row[j] * decay + xdt * b[j];
        row[j] = v;
        sum += v * c[j];
    }
    sum
}

/// The width-4 conv update of every channel: state row `ch` `(4)` becomes `[s1, s2, s3, x]`
/// (one `ext`), and `y[ch] = b[ch] + state · w[ch]`. `st`, `w` `(channels, 4)`; `x`, `b`, `y`
/// `(channels)`.
///
/// # Safety
/// NEON present.
#[target_feature(enable = "neon")]
pub(super) unsafe fn conv_update_width4(
    st: &mut [f32],
    w: &[f32],
    x: &[f32],
    b: &[f32],
    y: &mut [f32],
) {
    let c = y.len();
    assert!(st.len() >= 4 * c && w.len() >= 4 * c && x.len() >= c && b.len() >= c);
    let (sp, wp) = (st.as_mut_ptr(), w.as_ptr());
    for ch in 0..c {
        let s = vld1q_f32(sp.add(4 * ch));
        let shifted = vextq_f32::<1>(s, vdupq_n_f32(x[ch]));
        vst1q_f32(sp.add(4 * ch), shifted);
        y[ch] = b[ch] + vaddvq_f32(vmulq_f32(shifted, vld1q_f32(wp.add(4 * ch))));
    }
}

/// One RMSNorm group: `x = x · (mean(x²) + eps)^-½ · w`, `x`, `w` `(group)`.
///
/// # Safety
/// NEON present.
#[target_feature(enable = "neon")]
pub(super) unsafe fn rms_scale(x: &mut [f32], w: &[f32], eps: f32) {
    let n = x.len();
    assert!(w.len() >= n);
    let (p, wp) = (x.as_mut_ptr(), w.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let main = n - n % 16;
    let mut i = 0;
    while i < main {
        for (u, a) in acc.iter_mut().enumerate() {
            let v = vld1q_f32(p.add(i + 4 * u));
            *a = vfmaq_f32(*a, v, v);
        }
        i += 16;
    }
    let mut ss = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ));
    for v in &x[i..] {
        ss += v * v;
    }
    let inv = 1.0 / (ss / n as f32 + eps).sqrt();
    let main = n - n % 4;
    let mut i = 0;
    while i < main {
        let v = vmulq_n_f32(vld1q_f32(p.add(i)), inv);
        vst1q_f32(p.add(i), vmulq_f32(v, vld1q_f32(wp.add(i))));
        i += 4;
    }
    for j in main..n {
        x[j] = x[j] * inv * w[j];
    }
}
