//! CPU causal attention with grouped KV heads: prefill, continued prefill and decode.
//!
//! Reference: [`crate::attention::causal_attention_slow`]. Shapes: q
//! `(batch, q_len, n_heads, head_dim)`; k, v `(batch, kv_len, n_kv_heads, head_dim)`, read in
//! place through their strides (views narrowed out of a KV cache, whose batch stride is the
//! cache capacity); out `(batch, q_len, n_heads, head_dim)` in q's dtype. Query `i` sits at
//! position `off + i`, `off = kv_len - q_len`, and sees keys `0..=off + i`.
//!
//! Work items are `(batch, kv-head group, query block[, key split])`; an item's query rows are
//! the `rep = n_heads / n_kv_heads` heads of each of its kv heads × its query positions, so
//! each K/V row serves every query head that reads it. Per item, flash-attention style over
//! blocks of [`KV_BLOCK`] keys, up to the causal limit of the block's last query:
//! - `S = Q Kᵀ`, times `scale`;
//! - per row, keys past the row's causal limit get probability 0; online softmax: running max
//!   `m`, running sum `l`, the accumulator rescaled by `exp(m_old - m_new)`, `P = exp(S - m)`;
//! - `acc += P V`;
//!
//! and finally `out = acc / l`, rounded once to q's dtype. Two regimes by the rows per kv head:
//! - more than [`SMALL_ROWS`] (prefill): one kv head per item, at most [`ROWS`] rows; both
//!   products are GEMMs (`rows × kb × head_dim`, `rows × head_dim × kb`); f32 K/V go to the
//!   GEMM in place (row stride = the cache's position stride), 16-bit K/V are widened one block
//!   at a time;
//! - up to [`SMALL_ROWS`] (decode, a few speculative tokens): every kv head in one item, and the
//!   products are dot products and row updates straight from the cache, position by position
//!   and kv head by kv head, i.e. in memory order. (One kv head per item would read one
//!   `head_dim` row per cache position, a new 4 KiB page per row at 8 f32 heads of 128: that
//!   ran at a tenth of the read bandwidth.) With AVX-512 (`x86.rs`) K and V are read in their
//!   own dtype, 16-bit rows widened in registers, several positions per pass and software
//!   prefetch ahead of the stream; elsewhere (`lanes.rs`) short spans of positions are widened
//!   into scratch first. Parallelism then comes from splitting the keys.
//!
//! Memory per worker (this thread's reused scratch, all f32): Q and the accumulator
//! `rows × head_dim`, S `rows × KV_BLOCK`, one K or V block `KV_BLOCK × head_dim`: 0.37 MiB at
//! head_dim 128 for prefill (rows ≤ 128), whatever the prompt length; 0.2 MiB for a decode
//! token at 32 heads of 128.
//!
//! When there are fewer than [`ITEMS_PER_THREAD`] items per thread (decode unless the batch is
//! large, short prompts with few kv heads), the keys of each item are split too (each piece at
//! least [`MIN_SPLIT_KEYS`] long), every piece keeps its own `(m, l, acc)`, and a last pass
//! merges them (`out = Σ e^(m_s - M) acc_s / Σ e^(m_s - M) l_s`, `M = max m_s`), in a buffer of
//! `items × pieces × rows × (head_dim + 2)` floats.
//!
//! Preconditions (otherwise `Ok(None)`, the reference runs): CPU float storage; K and V with a
//! unit-stride head_dim (no copy of the cache is ever made; any other strides are read as they
//! are); no empty dimension. A q whose last dimension is strided is copied (it is small).

use super::common::{exp_f32, gemm_f32, view, with_scratch, OutPtr, OutVec, View};
use super::linear::Isa;
use crate::attention::AttnDims;
use crate::options::{current_options, Prefetch};
use crate::{AttentionArgs, Result};
use candle_core::Tensor;
use rayon::prelude::*;

mod lanes;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use lanes::{dots, row_max, row_sum};

/// Most query rows (`rep × positions`) per work item.
const ROWS: usize = 128;
/// Query rows up to which scores and the weighted sum are dot products and row updates
/// straight from the cache rather than GEMMs (decode, a few speculative tokens).
const SMALL_ROWS: usize = 16;
/// Most floats of a widened K/V span on the few-rows path (16 KiB).
const SPAN_FLOATS: usize = 4096;
/// Keys per block of the inner loop.
const KV_BLOCK: usize = 256;
/// Work items per rayon thread below which the keys are split as well.
const ITEMS_PER_THREAD: usize = 4;
/// Shortest key range worth a split of its own.
const MIN_SPLIT_KEYS: usize = 512;

struct Attn<'a> {
    q: View<'a>,
    k: View<'a>,
    v: View<'a>,
    d: AttnDims,
    /// Query heads per kv head.
    rep: usize,
    /// Query positions per block.
    qb: usize,
    /// Kv heads per item: all of them (few rows per kv head) or one.
    ng: usize,
    /// Absolute position of query 0.
    off: usize,
    scale: f32,
    /// Whether this CPU runs the AVX-512 kernels (`x86`) and compilation of the loop.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    avx512: bool,
    /// Software prefetch of the K and V streams in the AVX-512 kernels.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    prefetch: Prefetch,
}

/// One work item: `positions` queries from `i0`, of the query heads of kv heads `g0..g0 + ng`.
/// Row `r` is query `i0 + r % positions` of head `g0 · rep + r / positions`.
#[derive(Clone, Copy)]
struct Item {
    bi: usize,
    g0: usize,
    i0: usize,
    positions: usize,
}

/// Running softmax state of an item's rows: max `m`, sum `l`, accumulator `acc` (rows × head_dim).
struct State<'s> {
    m: &'s mut [f32],
    l: &'s mut [f32],
    acc: &'s mut [f32],
}

impl Attn<'_> {
    fn items(&self) -> usize {
        self.d.batch * (self.d.n_kv_heads / self.ng) * self.d.q_len.div_ceil(self.qb)
    }

    fn item(&self, idx: usize) -> Item {
        let nqb = self.d.q_len.div_ceil(self.qb);
        let groups = self.d.n_kv_heads / self.ng;
        let (bg, qblk) = (idx / nqb, idx % nqb);
        let i0 = qblk * self.qb;
        Item {
            bi: bg / groups,
            g0: (bg % groups) * self.ng,
            i0,
            positions: self.qb.min(self.d.q_len - i0),
        }
    }

    /// Most rows of an item.
    fn rows_max(&self) -> usize {
        self.ng * self.rep * self.qb
    }

    /// Keys the item's last query sees: `0..keys`.
    fn keys(&self, it: Item) -> usize {
        self.off + it.i0 + it.positions
    }

    /// Scratch floats of one item besides its state: Q, S and one K/V block.
    fn scratch_len(&self) -> usize {
        let (rows, dh) = (self.rows_max(), self.d.head_dim);
        rows * dh + rows * KV_BLOCK + (KV_BLOCK * dh).max(self.span_len() * self.ng * dh)
    }

    /// State floats of one item: m, l and acc.
    fn state_len(&self) -> usize {
        self.rows_max() * (2 + self.d.head_dim)
    }

    /// Positions `j0..j0 + cnt` × kv heads `g0..g0 + ng` of `t` as f32 rows of head_dim, with
    /// their position and head strides: in place for f32, widened into `buf` otherwise (one
    /// bulk conversion when the span is contiguous, as in a KV cache).
    #[inline(always)]
    fn span<'s>(
        &self,
        t: &View<'s>,
        (bi, g0, ng): (usize, usize, usize),
        j0: usize,
        cnt: usize,
        buf: &'s mut [f32],
    ) -> (&'s [f32], usize, usize) {
        let dh = self.d.head_dim;
        let start = t.at([bi, j0, g0, 0]);
        let ps = t.at([bi, j0 + 1, g0, 0]) - start;
        let hs = t.at([bi, j0, g0 + 1, 0]) - start;
        if let Some(s) = t.f32_slice(start, (cnt - 1) * ps + (ng - 1) * hs + dh) {
            return (s, ps, hs);
        }
        let buf = &mut buf[..cnt * ng * dh];
        if (ng == 1 || hs == dh) && (cnt == 1 || ps == ng * dh) {
            t.load(start, buf);
        } else {
            for (i, row) in buf.chunks_exact_mut(dh).enumerate() {
                t.load(start + (i / ng) * ps + (i % ng) * hs, row);
            }
        }
        (buf, ng * dh, dh)
    }

    /// Positions per [`Self::span`] of the few-rows path: the widened span of a 16-bit cache
    /// stays within [`SPAN_FLOATS`] (in L1), and is complete before the first dot product reads
    /// it (reading a row right after its narrower stores stalls on store forwarding).
    fn span_len(&self) -> usize {
        (SPAN_FLOATS / (self.ng * self.d.head_dim)).max(1)
    }

    /// Block `j0..j0 + kb` × all the item's kv heads of `t`, for the AVX-512 kernels.
    #[cfg(target_arch = "x86_64")]
    fn x86_block(&self, t: &View, it: Item, j0: usize, kb: usize) -> x86::Block {
        let base = t.at([it.bi, j0, it.g0, 0]);
        x86::Block {
            base,
            ps: t.at([it.bi, j0 + 1, it.g0, 0]) - base,
            hs: t.at([it.bi, j0, it.g0 + 1, 0]) - base,
            kb,
            ng: self.ng,
            per_g: self.rep * it.positions,
            dh: self.d.head_dim,
            prefetch: self.prefetch,
        }
    }

    /// Few-rows `S = Q Kᵀ` over keys `j0..j0 + kb`: position by position, kv head by kv head
    /// (the cache in memory order), each key row dotted with the query rows of its kv head.
    #[inline(always)]
    fn qk_small(&self, it: Item, j0: usize, kb: usize, q: &[f32], s: &mut [f32], kv: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            let b = self.x86_block(&self.k, it, j0, kb);
            // SAFETY: `avx512` is set only for the AVX-512 tier, which this CPU supports.
            return unsafe { x86::qk(self.k.data(), b, q, s) };
        }
        let (dh, per_g) = (self.d.head_dim, self.rep * it.positions);
        let mut jj = 0;
        while jj < kb {
            let cnt = self.span_len().min(kb - jj);
            let (ks, ps, hs) = self.span(&self.k, (it.bi, it.g0, self.ng), j0 + jj, cnt, kv);
            for p in 0..cnt {
                for g in 0..self.ng {
                    let k = &ks[p * ps + g * hs..][..dh];
                    let qg = &q[g * per_g * dh..(g + 1) * per_g * dh];
                    dots(qg, k, |r, v| s[(g * per_g + r) * kb + jj + p] = v);
                }
            }
            jj += cnt;
        }
    }

    /// Few-rows `acc += P V` over keys `j0..j0 + kb`, in the same order as [`Self::qk_small`].
    #[inline(always)]
    fn pv_small(&self, it: Item, j0: usize, kb: usize, s: &[f32], acc: &mut [f32], kv: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            let b = self.x86_block(&self.v, it, j0, kb);
            // SAFETY: as in `qk_small`.
            return unsafe { x86::pv(self.v.data(), b, s, acc) };
        }
        let (dh, per_g) = (self.d.head_dim, self.rep * it.positions);
        let mut jj = 0;
        while jj < kb {
            let cnt = self.span_len().min(kb - jj);
            let (vs, ps, hs) = self.span(&self.v, (it.bi, it.g0, self.ng), j0 + jj, cnt, kv);
            for p in 0..cnt {
                for g in 0..self.ng {
                    let v = &vs[p * ps + g * hs..][..dh];
                    let ag = &mut acc[g * per_g * dh..(g + 1) * per_g * dh];
                    for (r, ar) in ag.chunks_exact_mut(dh).enumerate() {
                        let w = s[(g * per_g + r) * kb + jj + p];
                        ar.iter_mut().zip(v).for_each(|(a, &v)| *a += w * v);
                    }
                }
            }
            jj += cnt;
        }
    }

    /// Attends the item's rows to keys `lo..hi`, from a fresh state, into `st`.
    fn run(&self, it: Item, keys: (usize, usize), scratch: &mut [f32], st: State) {
        #[cfg(target_arch = "x86_64")]
        if self.avx512 {
            #[target_feature(enable = "avx512f")]
            unsafe fn avx512(
                a: &Attn,
                it: Item,
                keys: (usize, usize),
                scratch: &mut [f32],
                st: State,
            ) {
                a.run_body(it, keys, scratch, st)
            }
            // SAFETY: `avx512` is set only for the AVX-512 tier, which this CPU supports.
            return unsafe { avx512(self, it, keys, scratch, st) };
        }
        self.run_body(it, keys, scratch, st)
    }

    /// Why two compilations of one body (as in `cpu/ssd.rs`): the crate is built for the baseline
    /// x86-64 target (SSE2); compiled with AVX-512, the `exp_f32` and reductions of the softmax
    /// and the accumulator rescaling run on 16 lanes (same operations, same results). The
    /// few-rows products are the FMA kernels of `x86.rs` there, the `lanes.rs` loops otherwise
    /// (results differ by rounding only).
    #[inline(always)]
    fn run_body(&self, it: Item, (lo, hi): (usize, usize), scratch: &mut [f32], st: State) {
        let (dh, n) = (self.d.head_dim, it.positions);
        // Rows per kv head, and in all.
        let per_g = self.rep * n;
        let rows = self.ng * per_g;
        let (q, rest) = scratch.split_at_mut(rows * dh);
        let (s, kv) = rest.split_at_mut(rows * KV_BLOCK);
        for (r, qr) in q.chunks_exact_mut(dh).enumerate() {
            let h = it.g0 * self.rep + r / n;
            self.q.load(self.q.at([it.bi, it.i0 + r % n, h, 0]), qr);
        }
        let State { m, l, acc } = st;
        let (m, l, acc) = (&mut m[..rows], &mut l[..rows], &mut acc[..rows * dh]);
        m.fill(f32::NEG_INFINITY);
        l.fill(0.0);
        acc.fill(0.0);
        let small = per_g <= SMALL_ROWS;
        let mut j0 = lo;
        while j0 < hi {
            let kb = KV_BLOCK.min(hi - j0);
            let s = &mut s[..rows * kb];
            // S = Q Kᵀ: (rows, kb)
            if small {
                self.qk_small(it, j0, kb, q, s, kv);
            } else {
                let (k, krs, _) = self.span(&self.k, (it.bi, it.g0, 1), j0, kb, kv);
                gemm_f32(
                    (rows, kb, dh),
                    s,
                    (kb, 1),
                    None,
                    q,
                    (dh, 1),
                    k,
                    (1, krs),
                    1.0,
                );
            }
            for (r, sr) in s.chunks_exact_mut(kb).enumerate() {
                // Keys j0..j0 + visible are at or before this row's position.
                let visible = (self.off + it.i0 + r % n + 1).saturating_sub(j0).min(kb);
                let (seen, hidden) = sr.split_at_mut(visible);
                hidden.fill(0.0);
                if visible == 0 {
                    continue;
                }
                seen.iter_mut().for_each(|x| *x *= self.scale);
                let m_new = m[r].max(row_max(seen));
                // 0 on the row's first block (m = -inf): acc and l are still 0.
                let corr = exp_f32(m[r] - m_new);
                seen.iter_mut().for_each(|x| *x = exp_f32(*x - m_new));
                l[r] = l[r] * corr + row_sum(seen);
                if corr != 1.0 {
                    acc[r * dh..(r + 1) * dh]
                        .iter_mut()
                        .for_each(|a| *a *= corr);
                }
                m[r] = m_new;
            }
            // acc += P V: (rows, head_dim)
            if small {
                self.pv_small(it, j0, kb, s, acc, kv);
            } else {
                let (v, vrs, _) = self.span(&self.v, (it.bi, it.g0, 1), j0, kb, kv);
                gemm_f32(
                    (rows, dh, kb),
                    acc,
                    (dh, 1),
                    Some(1.0),
                    s,
                    (kb, 1),
                    v,
                    (vrs, 1),
                    1.0,
                );
            }
            j0 += kb;
        }
    }

    /// Stores row `r` of an item (`vals`, already normalised) into the output.
    fn store(&self, it: Item, r: usize, out: OutPtr, vals: &[f32]) {
        let (d, n) = (&self.d, it.positions);
        let h = it.g0 * self.rep + r / n;
        let i = it.i0 + r % n;
        // SAFETY: each (batch, query, head) row belongs to exactly one item and row.
        unsafe { out.store(((it.bi * d.q_len + i) * d.n_heads + h) * d.head_dim, vals) };
    }
}

#[cfg(target_arch = "x86_64")]
fn isa_avx512(isa: Isa) -> bool {
    isa == Isa::Avx512
}

#[cfg(not(target_arch = "x86_64"))]
fn isa_avx512(_: Isa) -> bool {
    false
}

/// Unit stride in the last dimension (or a last dimension of 1).
fn unit_last(t: &Tensor) -> bool {
    t.dims().last().is_some_and(|&n| n <= 1) || t.stride().last() == Some(&1)
}

pub(crate) fn causal_attention(args: &AttentionArgs) -> Result<Option<Tensor>> {
    let opts = current_options().cpu;
    causal_attention_on((Isa::from_tier(opts.effective_tier()), opts.prefetch), args)
}

/// [`causal_attention`] with the kernels of `isa` (AVX-512, or the portable loops otherwise).
pub(crate) fn causal_attention_on(
    (isa, prefetch): (Isa, Prefetch),
    args: &AttentionArgs,
) -> Result<Option<Tensor>> {
    let d = crate::attention::validate(args)?;
    if d.batch * d.q_len * d.n_heads * d.head_dim == 0 || !unit_last(args.k) || !unit_last(args.v) {
        return Ok(None);
    }
    view!(q = args.q);
    let (kg, kl) = args.k.storage_and_layout();
    let (vg, vl) = args.v.storage_and_layout();
    let (Some(k), Some(v)) = (View::new(&kg, kl), View::new(&vg, vl)) else {
        return Ok(None);
    };
    let rep = d.n_heads / d.n_kv_heads;
    // Few rows per kv head: all kv heads in one item (see the module docs).
    let small = rep * d.q_len <= SMALL_ROWS;
    let attn = Attn {
        q,
        k,
        v,
        d,
        rep,
        qb: if small {
            d.q_len
        } else {
            (ROWS / rep).clamp(1, d.q_len)
        },
        ng: if small { d.n_kv_heads } else { 1 },
        off: d.kv_len - d.q_len,
        scale: args.scale as f32,
        avx512: isa_avx512(isa),
        prefetch,
    };
    let Some(mut out) = OutVec::new(args.q.dtype(), d.batch * d.q_len * d.n_heads * d.head_dim)
    else {
        return Ok(None);
    };
    let writer = out.writer();
    let items = attn.items();
    let longest = d.kv_len; // the keys of the last query block
    let threads = rayon::current_num_threads();
    let splits = if items >= ITEMS_PER_THREAD * threads {
        1
    } else {
        (ITEMS_PER_THREAD * threads)
            .div_ceil(items)
            .min(longest / MIN_SPLIT_KEYS)
            .max(1)
    };
    if splits == 1 {
        single(&attn, items, writer);
    } else {
        split(&attn, items, splits, writer);
    }
    Ok(Some(out.into_tensor(args.q.dims())?))
}

/// Every item over all its keys, normalised straight into the output.
fn single(attn: &Attn, items: usize, out: OutPtr) {
    let (dh, rows_max) = (attn.d.head_dim, attn.rows_max());
    let (scratch, state) = (attn.scratch_len(), attn.state_len());
    (0..items).into_par_iter().for_each(|idx| {
        with_scratch(scratch + state, |buf| {
            let it = attn.item(idx);
            let (work, st) = buf.split_at_mut(scratch);
            let (m, rest) = st.split_at_mut(rows_max);
            let (l, acc) = rest.split_at_mut(rows_max);
            attn.run(it, (0, attn.keys(it)), work, State { m, l, acc });
            for r in 0..attn.ng * attn.rep * it.positions {
                let inv = 1.0 / l[r];
                let row = &mut acc[r * dh..(r + 1) * dh];
                row.iter_mut().for_each(|a| *a *= inv);
                attn.store(it, r, out, row);
            }
        })
    });
}

/// Every item's keys in `splits` pieces (decode with few heads), then the log-sum-exp merge.
fn split(attn: &Attn, items: usize, splits: usize, out: OutPtr) {
    let (dh, rows_max) = (attn.d.head_dim, attn.rows_max());
    let (scratch, state) = (attn.scratch_len(), attn.state_len());
    // (items, splits, [m (rows), l (rows), acc (rows × head_dim)])
    let mut parts = vec![0f32; items * splits * state];
    parts.par_chunks_mut(state).enumerate().for_each(|(p, st)| {
        let (idx, s) = (p / splits, p % splits);
        let it = attn.item(idx);
        let keys = attn.keys(it);
        // Pieces of whole key blocks; the last ones may be empty.
        let per = keys.div_ceil(splits).div_ceil(KV_BLOCK) * KV_BLOCK;
        let (lo, hi) = ((s * per).min(keys), ((s + 1) * per).min(keys));
        let (m, rest) = st.split_at_mut(rows_max);
        let (l, acc) = rest.split_at_mut(rows_max);
        with_scratch(scratch, |work| {
            attn.run(it, (lo, hi), work, State { m, l, acc })
        });
    });
    (0..items).into_par_iter().for_each(|idx| {
        let it = attn.item(idx);
        let pieces = &parts[idx * splits * state..(idx + 1) * splits * state];
        let mut row = vec![0f32; dh];
        for r in 0..attn.ng * attn.rep * it.positions {
            let m_of = |s: usize| pieces[s * state + r];
            let big_m = (0..splits).map(m_of).fold(f32::NEG_INFINITY, f32::max);
            row.fill(0.0);
            let mut l = 0f32;
            for s in (0..splits).filter(|&s| m_of(s) > f32::NEG_INFINITY) {
                let piece = &pieces[s * state..(s + 1) * state];
                let w = exp_f32(m_of(s) - big_m);
                l += w * piece[rows_max + r];
                let acc = &piece[2 * rows_max + r * dh..2 * rows_max + (r + 1) * dh];
                row.iter_mut().zip(acc).for_each(|(o, &a)| *o += w * a);
            }
            let inv = 1.0 / l;
            row.iter_mut().for_each(|o| *o *= inv);
            attn.store(it, r, out, &row);
        }
    });
}
