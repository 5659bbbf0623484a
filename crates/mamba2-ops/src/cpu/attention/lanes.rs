//! Portable f32 loops of the attention kernel, written with independent accumulator lanes so
//! that they vectorize on any target (and on 16 lanes in the AVX-512 compilation of the loop).

/// Accumulator lanes of the reductions.
const LANES: usize = 16;

/// Sum of the lanes as a tree (4 dependent adds instead of 15).
#[inline(always)]
fn hsum(mut v: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            v[i] += v[i + w];
        }
        w /= 2;
    }
    v[0]
}

/// `put(r, q_r · k)` for every row of `q` (`rows × head_dim`, `head_dim = k.len()`). Four rows
/// at a time: each chunk of `k` is loaded once for the four, and their four accumulator chains
/// run side by side.
#[inline(always)]
pub(super) fn dots(q: &[f32], k: &[f32], mut put: impl FnMut(usize, f32)) {
    let dh = k.len();
    let (body, tail) = (dh - dh % LANES, dh % LANES);
    let mut quads = q.chunks_exact(4 * dh);
    for (i4, q4) in (&mut quads).enumerate() {
        let mut acc = [[0f32; LANES]; 4];
        for c in (0..body).step_by(LANES) {
            let kc = &k[c..c + LANES];
            for (a, qr) in acc.iter_mut().zip(q4.chunks_exact(dh)) {
                let qc = &qr[c..c + LANES];
                for l in 0..LANES {
                    a[l] += qc[l] * kc[l];
                }
            }
        }
        for (i, (a, qr)) in acc.into_iter().zip(q4.chunks_exact(dh)).enumerate() {
            let t: f32 = (body..body + tail).map(|c| qr[c] * k[c]).sum();
            put(4 * i4 + i, hsum(a) + t);
        }
    }
    let done = q.len() / dh - quads.remainder().len() / dh;
    for (i, qr) in quads.remainder().chunks_exact(dh).enumerate() {
        put(done + i, dot(qr, k));
    }
}

/// Dot product with independent lanes, so the loop vectorizes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    hsum(acc) + tail
}

/// Max with independent lanes, so the loop vectorizes.
#[inline(always)]
pub(super) fn row_max(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut it = v.chunks_exact(LANES);
    for c in &mut it {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let m = acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    it.remainder().iter().fold(m, |a, &b| a.max(b))
}

/// Sum with independent lanes, so the loop vectorizes.
#[inline(always)]
pub(super) fn row_sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut it = v.chunks_exact(LANES);
    for c in &mut it {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    hsum(acc) + it.remainder().iter().sum::<f32>()
}
