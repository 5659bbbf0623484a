//! CPU `linear`: `y = x · weightᵀ (+ bias)` for f32, f16 and bf16 weights, f32 accumulation.
//!
//! Reference: [`crate::linear::linear_slow`]. Shapes: x `(..., in)` (`rows` = product of the
//! leading dims), weight `(out, in)` contiguous row-major, bias `(out)`, y `(..., out)` in x's
//! dtype.
//!
//! Why: at decode time the projections (`in_proj`, `out_proj`, the LM head) see one row per
//! sequence, so they are bound by the bytes of weight streamed from memory, not by arithmetic.
//! Candle's CPU matmul treats them as a general GEMM (and has no fast bf16 kernel at all), which
//! leaves part of the memory bandwidth unused. Here every weight row is read once per call and
//! dotted with the rows of x while it is in registers; 16-bit weights are widened to f32 in
//! registers (F16C `vcvtph2ps` for f16, a 16-bit shift for bf16) and every product is
//! accumulated in f32. The output rows are split over the Rayon pool, so both cores stream their
//! share of the weight.
//!
//! Three regimes, by the number of x rows:
//! - 1..=[`STREAM_ROWS`] (decode): one weight row at a time (a single sequential stream per core,
//!   what the hardware prefetchers follow best; the AVX-512 kernels also prefetch 8 KiB ahead in
//!   software, past the 4 KiB pages where hardware prefetch stops), unrolled 4 ways against each
//!   x row;
//! - more rows: tiles of [`MW`] weight rows x up to [`NX`] x rows, `MW x NX` vector
//!   accumulators, so every weight load serves several x rows and every x load several weights;
//!   work items are then 2-D (row blocks x weight blocks, weight-major);
//! - from `GEMM_MIN_ROWS` on, with AVX-512: the packed outer-product GEMM of [`gemm`] (prefill).
//!
//! Kernels, picked from the tier of the options in force ([`crate::options::CpuTier`]):
//! AVX-512F (+BW/VL for the masked 16-bit tails) and AVX2+FMA+F16C (`x86`), NEON (`neon`), and
//! a portable loop. Register budget of the largest AVX-512 tile (4 x 4):
//! 16 accumulators + 4 weight + 1 x vector of the 32 zmm.
//!
//! A 16-bit x is converted once to f32 in this thread's reusable scratch (a few KiB at decode;
//! an f32 x is read in place), so the only allocation of a decode call is the output.
//!
//! AVX512_BF16's `vdpbf16ps` (stable in Rust 1.95) was tried for bf16 weights and measured no
//! faster than widening (the loop is bound by memory, and x then needs converting per row), so
//! it is not used.

use super::common::{view_opt, with_scratch, OutVec, View};
use crate::options::{current_options, CpuOptions, CpuTier, Prefetch};
use crate::Result;
use candle_core::{CpuStorage, Storage, Tensor};
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

/// Rows of a 16-bit x converted to f32 per pass, which bounds this thread's scratch at
/// `X_CHUNK_ROWS × in` floats (2 MiB at in = 2048) however long a prefill is. There is no upper
/// limit on the rows: the fast path beats Candle's GEMM at prefill sizes too (1.7-2.1x at 512
/// and 2048 rows of the 130m projections, `cargo bench --bench cpu_ops -- linear`), so it takes
/// every row count.
const X_CHUNK_ROWS: usize = 256;
/// Weight rows per tile.
const MW: usize = 4;
/// Most x rows per tile.
const NX: usize = 4;
/// Weight rows per parallel work item: a multiple of [`MW`], small enough that the 768-row
/// `out_proj` still splits into dozens of items, large enough to keep Rayon's per-item cost small.
const BLOCK: usize = 32;

/// Weight storage of one dtype.
#[derive(Clone, Copy)]
enum Weight<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

/// Instruction set of the kernels: the tier of the options in force ([`CpuTier`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "aarch64")]
    Neon,
    Portable,
}

impl Isa {
    /// The kernels of `tier` (the portable ones for a tier of another architecture; callers
    /// pass [`crate::options::CpuOptions::effective_tier`], which this CPU supports).
    pub(crate) fn from_tier(tier: CpuTier) -> Self {
        match tier {
            #[cfg(target_arch = "x86_64")]
            CpuTier::Avx512 => Self::Avx512,
            #[cfg(target_arch = "x86_64")]
            CpuTier::Avx2 => Self::Avx2,
            #[cfg(target_arch = "aarch64")]
            CpuTier::Neon => Self::Neon,
            _ => Self::Portable,
        }
    }

    /// The tier these kernels belong to.
    pub(crate) fn tier(self) -> CpuTier {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => CpuTier::Avx512,
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => CpuTier::Avx2,
            #[cfg(target_arch = "aarch64")]
            Self::Neon => CpuTier::Neon,
            Self::Portable => CpuTier::Generic,
        }
    }

    /// The kernels of the tier in force on this thread.
    #[cfg(test)]
    pub(crate) fn current() -> Self {
        Self::from_tier(current_options().cpu.effective_tier())
    }

    /// Every instruction set this machine can run (for the kernel unit tests).
    #[cfg(test)]
    fn available() -> Vec<Self> {
        CpuTier::available()
            .into_iter()
            .map(Self::from_tier)
            .collect()
    }
}

/// `out[r][m] = Σ_k x[r][k] · w[m][k]` for a tile of `M` weight rows and `N` x rows, each row
/// `k` elements long. Unsafe: every pointer must be valid for `k` reads, and the fn must only be
/// called on a CPU with the kernel's instruction set.
type TileFn<T, const M: usize, const N: usize> =
    unsafe fn([*const T; M], [*const f32; N], usize, Prefetch) -> [[f32; M]; N];

/// The tiles of one kernel family: `s*` stream one weight row (`M = 1`) against 1..=4 x rows,
/// `t*` take [`MW`] weight rows at a time.
struct Tiles<T> {
    s1: TileFn<T, 1, 1>,
    s2: TileFn<T, 1, 2>,
    s3: TileFn<T, 1, 3>,
    s4: TileFn<T, 1, 4>,
    t1: TileFn<T, MW, 1>,
    t2: TileFn<T, MW, 2>,
    t3: TileFn<T, MW, 3>,
    t4: TileFn<T, MW, 4>,
}

/// Builds a [`Tiles`] from a tile fn generic over `<M, N>`.
macro_rules! tiles {
    ($($f:tt)+) => {
        Tiles {
            s1: $($f)+::<1, 1>,
            s2: $($f)+::<1, 2>,
            s3: $($f)+::<1, 3>,
            s4: $($f)+::<1, 4>,
            t1: $($f)+::<MW, 1>,
            t2: $($f)+::<MW, 2>,
            t3: $($f)+::<MW, 3>,
            t4: $($f)+::<MW, 4>,
        }
    };
}

/// Vectors per weight row and step: a single streamed row is unrolled 4 ways so that it still has
/// 4 independent FMA chains per x row; a tile of `MW` rows already has `MW`.
const fn unroll(m: usize) -> usize {
    if m == 1 {
        4
    } else {
        1
    }
}

/// Widening of one weight element, for the portable kernel and the AVX2 tails.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
trait Widen: Copy + Send + Sync {
    const IS_F32: bool = false;
    fn widen(self) -> f32;
    /// Bulk conversion (F16C for f16 when the CPU has it).
    fn widen_slice(src: &[Self], dst: &mut [f32]);
    /// The slice itself when it already is f32.
    fn as_f32(_src: &[Self]) -> Option<&[f32]> {
        None
    }
}
impl Widen for f32 {
    const IS_F32: bool = true;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    fn as_f32(src: &[Self]) -> Option<&[f32]> {
        Some(src)
    }
    fn widen_slice(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src)
    }
}
impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn widen_slice(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
}
impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn widen_slice(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst)
    }
}

/// Portable tile: 8 independent lanes per accumulator so that the compiler can vectorize the
/// baseline target's SSE2. No software prefetch.
///
/// # Safety
/// Pointers valid for `k` reads.
unsafe fn tile_portable<T: Widen, const M: usize, const N: usize>(
    w: [*const T; M],
    x: [*const f32; N],
    k: usize,
    _: Prefetch,
) -> [[f32; M]; N] {
    const L: usize = 8;
    let w: [&[T]; M] = w.map(|p| std::slice::from_raw_parts(p, k));
    let x: [&[f32]; N] = x.map(|p| std::slice::from_raw_parts(p, k));
    let mut acc = [[[0f32; L]; M]; N];
    let main = k - k % L;
    let mut wb = [[0f32; L]; M];
    for i in (0..main).step_by(L) {
        for m in 0..M {
            for l in 0..L {
                wb[m][l] = w[m][i + l].widen();
            }
        }
        for r in 0..N {
            for m in 0..M {
                for l in 0..L {
                    acc[r][m][l] += x[r][i + l] * wb[m][l];
                }
            }
        }
    }
    let mut out = [[0f32; M]; N];
    for r in 0..N {
        for m in 0..M {
            let mut s: f32 = acc[r][m].iter().sum();
            for i in main..k {
                s += x[r][i] * w[m][i].widen();
            }
            out[r][m] = s;
        }
    }
    out
}

fn portable_tiles<T: Widen>() -> Tiles<T> {
    struct P<T>(T);
    impl<T: Widen> P<T> {
        unsafe fn f<const M: usize, const N: usize>(
            w: [*const T; M],
            x: [*const f32; N],
            k: usize,
            pf: Prefetch,
        ) -> [[f32; M]; N] {
            tile_portable::<T, M, N>(w, x, k, pf)
        }
    }
    tiles!(P::<T>::f)
}

#[cfg(target_arch = "x86_64")]
mod gemm;

/// From this many rows on, AVX-512 machines use the packed GEMM of [`gemm`] instead of the
/// dot-product tiles: `(f32 weights, 16-bit weights)`. Measured (`cargo bench --bench cpu_ops
/// -- linear`, 130m `in_proj`, same run): with f32 weights the GEMM is 1.4-2x the tiles' speed
/// from 32 rows on; 16-bit weights must first be widened to f32 (the whole matrix, per call and
/// x chunk), which costs 0.75x at 32 rows, breaks even near 128 and pays from 256 rows (1.1x).
#[cfg(target_arch = "x86_64")]
const GEMM_MIN_ROWS: (usize, usize) = (32, 256);

#[cfg(target_arch = "x86_64")]
mod gemm_bf16;

/// From this many rows on, bf16 activations against bf16 weights take [`gemm_bf16`] (no
/// weight widening to amortise, so the threshold is the f32 GEMM's).
#[cfg(target_arch = "x86_64")]
const BF16_GEMM_MIN_ROWS: usize = 32;

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(target_arch = "aarch64")]
mod neon;

/// Kernel family for weights of type `T` on `isa`.
trait Kernels: Widen + Sized {
    fn tiles(isa: Isa) -> Tiles<Self>;
}
macro_rules! kernels {
    ($t:ty, $avx512:ident, $avx2:ident, $neon:ident) => {
        impl Kernels for $t {
            fn tiles(isa: Isa) -> Tiles<Self> {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => x86::$avx512(),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => x86::$avx2(),
                    #[cfg(target_arch = "aarch64")]
                    Isa::Neon => neon::$neon(),
                    Isa::Portable => portable_tiles(),
                }
            }
        }
    };
}
kernels!(f32, avx512_f32, avx2_f32, neon_f32);
kernels!(f16, avx512_f16, avx2_f16, neon_f16);
kernels!(bf16, avx512_bf16, avx2_bf16, neon_bf16);

/// Calls the tile of width `n` (1..=4) from family `$s1..$s4` on weight rows `$wp` and x rows
/// `$xp(0..n)`, handing each `(x row, results)` to `$put`.
macro_rules! call_tile {
    ($tiles:expr, $s1:ident, $s2:ident, $s3:ident, $s4:ident, $n:expr, $wp:expr, $xp:expr, ($k:expr, $pf:expr), $put:expr) => {
        match $n {
            1 => ($tiles.$s1)($wp, [$xp(0)], $k, $pf)
                .iter()
                .enumerate()
                .for_each($put),
            2 => ($tiles.$s2)($wp, [$xp(0), $xp(1)], $k, $pf)
                .iter()
                .enumerate()
                .for_each($put),
            3 => ($tiles.$s3)($wp, [$xp(0), $xp(1), $xp(2)], $k, $pf)
                .iter()
                .enumerate()
                .for_each($put),
            _ => ($tiles.$s4)($wp, [$xp(0), $xp(1), $xp(2), $xp(3)], $k, $pf)
                .iter()
                .enumerate()
                .for_each($put),
        }
    };
}

/// Up to this many x rows the weight rows are streamed one at a time (see [`STREAM_ROWS`] use in
/// [`block`]); above, [`MW`]-row tiles reuse each x load for several weight rows.
///
/// Why: reading one weight row at a time keeps a single sequential stream per core, which the
/// hardware prefetchers follow best: measured at the 50288 x 768 LM head with one x row, 2
/// threads, the 4-row tiles read f16/bf16 weights at ~21 GB/s and single rows at ~63 GB/s.
const STREAM_ROWS: usize = 4;

/// `y[r][o] = Σ_k x[r][k] · w[o][k]` for all `rows` rows of x and the weight rows
/// `o0..o0 + n_out`; `y` is `(rows, BLOCK)` row-major (columns past `n_out` untouched).
///
/// `w` `(out, k)` row-major; `x` `(rows, k)` row-major f32.
fn block<T: Kernels>(
    (tiles, pf): (&Tiles<T>, Prefetch),
    w: &[T],
    x: &[f32],
    (k, rows): (usize, usize),
    (o0, n_out): (usize, usize),
    y: &mut [f32],
) {
    debug_assert!(n_out <= BLOCK && rows <= ROW_BLOCK && y.len() >= rows * BLOCK);
    let last = o0 + n_out - 1;
    assert!((last + 1) * k <= w.len() && rows * k <= x.len());
    // SAFETY (pointer helpers): weight rows `<= last` and x rows `< rows` lie inside `w` and `x`
    // (asserted above).
    let wrow = |o: usize| unsafe { w.as_ptr().add(o.min(last) * k) };
    let mut r0 = 0;
    while r0 < rows {
        let n = (rows - r0).min(NX);
        let xp = |j: usize| unsafe { x.as_ptr().add((r0 + j) * k) };
        if rows <= STREAM_ROWS {
            for t in 0..n_out {
                let put = |(r, v): (usize, &[f32; 1])| y[(r0 + r) * BLOCK + t] = v[0];
                // SAFETY: pointers valid for `k` reads (above); `tiles` was built for an
                // instruction set this CPU supports (`Isa::from_tier` of a supported tier).
                unsafe { call_tile!(tiles, s1, s2, s3, s4, n, [wrow(o0 + t)], xp, (k, pf), put) }
            }
        } else {
            for t in (0..n_out).step_by(MW) {
                // A partial last tile repeats the block's last weight row; its results are
                // dropped.
                let wp: [*const T; MW] = std::array::from_fn(|m| wrow(o0 + t + m));
                let put = |(r, v): (usize, &[f32; MW])| {
                    for (m, &v) in v.iter().enumerate().take(n_out - t) {
                        y[(r0 + r) * BLOCK + t + m] = v;
                    }
                };
                // SAFETY: as above.
                unsafe { call_tile!(tiles, t1, t2, t3, t4, n, wp, xp, (k, pf), put) }
            }
        }
        r0 += n;
    }
}

/// Rows of x per parallel work item (the stack buffer of a block holds `ROW_BLOCK × BLOCK`
/// results).
const ROW_BLOCK: usize = 16;

/// Runs the whole product on `isa`. Work items are (block of [`ROW_BLOCK`] x rows, block of
/// [`BLOCK`] weight rows), split over the Rayon pool in weight-major order: consecutive items
/// share a weight block (kept in L2 while the x blocks pass by), so the weight is streamed from
/// memory once per call whatever the number of rows; a decode call (rows <= `ROW_BLOCK`) is
/// split over the weight rows only. Each item's results (plus bias) are stored into `out` row by
/// row.
///
/// `x` `(rows, k)` f32 row-major, `w` `(out_f, k)`, bias `(out_f)`; the results go to rows
/// `row_off..row_off + rows` of `out` `(.., out_f)`.
fn run<T: Kernels>(
    (isa, pf): (Isa, Prefetch),
    w: &[T],
    x: &[f32],
    (rows, k, out_f): (usize, usize, usize),
    bias: Option<View<'_>>,
    (out, row_off): (&mut OutVec, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512
        && rows
            >= if T::IS_F32 {
                GEMM_MIN_ROWS.0
            } else {
                GEMM_MIN_ROWS.1
            }
    {
        return gemm::run(w, x, (rows, k, out_f), bias, (out, row_off));
    }
    let tiles = T::tiles(isa);
    let writer = out.writer();
    let n_wb = out_f.div_ceil(BLOCK);
    let n_rb = rows.div_ceil(ROW_BLOCK);
    (0..n_rb * n_wb).into_par_iter().for_each(|item| {
        let (rb, wb) = (item % n_rb, item / n_rb);
        let (r0, o0) = (rb * ROW_BLOCK, wb * BLOCK);
        let n_rows = (rows - r0).min(ROW_BLOCK);
        let n_out = (out_f - o0).min(BLOCK);
        // (ROW_BLOCK, BLOCK) on the stack: 2 KiB.
        let mut y = [0f32; ROW_BLOCK * BLOCK];
        let xs = &x[r0 * k..(r0 + n_rows) * k]; // (n_rows, k)
        block((&tiles, pf), w, xs, (k, n_rows), (o0, n_out), &mut y);
        let mut bv = [0f32; BLOCK];
        if let Some(bias) = &bias {
            bias.load(bias.at([0, 0, 0, o0]), &mut bv[..n_out]);
        }
        for r in 0..n_rows {
            let yr = &mut y[r * BLOCK..r * BLOCK + n_out];
            if bias.is_some() {
                yr.iter_mut().zip(&bv).for_each(|(y, b)| *y += b);
            }
            // SAFETY: item (rb, wb) owns columns `o0..o0 + n_out` of rows `r0..r0 + n_rows`.
            unsafe { writer.store((row_off + r0 + r) * out_f + o0, yr) };
        }
    });
}

/// Fast path of [`crate::linear::linear`] for a contiguous CPU weight (any number of rows);
/// `Ok(None)` otherwise.
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let opts = current_options().cpu;
    let isa = Isa::from_tier(opts.effective_tier());
    let r = linear_on((isa, &opts), x, weight, bias)?;
    if r.is_some() {
        super::record_tier("linear", isa.tier());
    }
    Ok(r)
}

/// [`linear`] on an explicit instruction set (the unit tests run every one this CPU has).
pub(crate) fn linear_on(
    (isa, opts): (Isa, &CpuOptions),
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (out_f, k) = weight.dims2()?;
    if k == 0 || out_f == 0 || !weight.is_contiguous() {
        return Ok(None);
    }
    let rows = x.elem_count() / k;
    if rows == 0 {
        return Ok(None);
    }
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has rank >= 1 (validated)") = out_f;
    let (wg, wl) = weight.storage_and_layout();
    let Storage::Cpu(wc) = &*wg else {
        return Ok(None);
    };
    let (ws, we) = (wl.start_offset(), wl.start_offset() + out_f * k);
    let w = match wc {
        CpuStorage::F32(v) => Weight::F32(&v[ws..we]),
        CpuStorage::F16(v) => Weight::F16(&v[ws..we]),
        CpuStorage::BF16(v) => Weight::Bf16(&v[ws..we]),
        _ => return Ok(None),
    };
    view_opt!(bias = bias);
    // x as (rows, k): free for a contiguous x, one small copy otherwise (Candle's reshape copies
    // a non-contiguous tensor).
    let x2 = x.reshape((rows, k))?; // (rows, k)
    let (xg, xl) = x2.storage_and_layout();
    let Some(xv) = View::new(&xg, xl) else {
        return Ok(None);
    };
    let Some(mut out) = OutVec::new(x.dtype(), rows * out_f) else {
        return Ok(None);
    };
    let start = xl.start_offset();
    #[cfg(target_arch = "x86_64")]
    if let (Weight::Bf16(wb), super::common::Data::Bf16(xb)) = (w, xv.data()) {
        if isa == Isa::Avx512
            && k.is_multiple_of(2)
            && rows >= BF16_GEMM_MIN_ROWS
            && opts.bf16_gemm
            && gemm_bf16::available()
        {
            gemm_bf16::run(
                wb,
                &xb[start..start + rows * k],
                (rows, k, out_f),
                bias,
                &mut out,
            );
            return Ok(Some(out.into_tensor(&out_dims)?));
        }
    }
    let pf = opts.prefetch;
    let go = |xf: &[f32], n: usize, out: &mut OutVec, r0: usize| match w {
        Weight::F32(w) => run((isa, pf), w, xf, (n, k, out_f), bias, (out, r0)),
        Weight::F16(w) => run((isa, pf), w, xf, (n, k, out_f), bias, (out, r0)),
        Weight::Bf16(w) => run((isa, pf), w, xf, (n, k, out_f), bias, (out, r0)),
    };
    match xv.f32_slice(start, rows * k) {
        Some(xf) => go(xf, rows, &mut out, 0),
        None => {
            for r0 in (0..rows).step_by(X_CHUNK_ROWS) {
                let n = (rows - r0).min(X_CHUNK_ROWS);
                with_scratch(n * k, |xf| {
                    xv.load(start + r0 * k, xf);
                    go(xf, n, &mut out, r0)
                });
            }
        }
    }
    Ok(Some(out.into_tensor(&out_dims)?))
}

/// Converts `src` to f32 (used by the tests to build inputs of each dtype).
#[cfg(test)]
fn widen_all<T: Widen>(src: &[T]) -> Vec<f32> {
    src.iter().map(|v| v.widen()).collect()
}

#[cfg(test)]
mod tests;
