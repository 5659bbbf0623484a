//! Both kernel families (AVX-512 where this CPU has it, and the portable loops, which the
//! dispatcher would not pick here) against the reference, on shapes that reach every path:
//! few rows per kv head with and without split keys, per-group row counts that are not a
//! multiple of 4, head_dim tails (not a multiple of 16), and the GEMM path. The public op's tests
//! (`tests/cpu_attention.rs`) cover the dispatch and the model shapes.

use super::*;
use crate::attention::causal_attention_slow;
use candle_core::{DType, Device};

fn lcg_tensor(seed: &mut u64, dims: &[usize], dtype: DType) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn max_excess(got: &Tensor, want: &Tensor, (atol, rtol): (f32, f32)) -> f32 {
    let flat = |t: &Tensor| -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (g, w) = (flat(got), flat(want));
    assert_eq!(g.len(), w.len());
    g.iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs() - (atol + rtol * b.abs()))
        .fold(f32::NEG_INFINITY, |m, e| {
            if e.is_nan() {
                f32::INFINITY
            } else {
                m.max(e)
            }
        })
}

#[test]
fn every_isa_matches_reference() {
    let mut isas = vec![Isa::Portable];
    if Isa::current() != Isa::Portable {
        isas.push(Isa::current());
    }
    // (batch, q_len, kv_len, capacity, n_heads, n_kv_heads, head_dim)
    let cases = [
        (2, 1, 300, 310, 6, 2, 20), // decode, head_dim tail of 4, rows per group 3
        (1, 3, 40, 50, 8, 2, 36),   // 3 speculative tokens: 12 rows per group
        (1, 1, 1100, 1100, 3, 1, 64), // one item: split keys, merged
        (1, 2, 1300, 1400, 2, 2, 17), // split keys, q_len 2, head_dim 17
        (2, 40, 60, 64, 8, 2, 24),  // GEMM path, last query block short
    ];
    let mut seed = 5;
    for isa in isas {
        for &(b, ql, kl, cap, nh, nkv, dh) in &cases {
            for (dtype, tol) in [
                (DType::F32, (1e-6, 1e-5)),
                (DType::F16, (1e-5, 2e-3)),
                (DType::BF16, (1e-5, 1e-2)),
            ] {
                let q = lcg_tensor(&mut seed, &[b, ql, nh, dh], dtype);
                let kc = lcg_tensor(&mut seed, &[b, cap, nkv, dh], dtype);
                let vc = lcg_tensor(&mut seed, &[b, cap, nkv, dh], dtype);
                let (k, v) = (kc.narrow(1, 0, kl).unwrap(), vc.narrow(1, 0, kl).unwrap());
                let args = AttentionArgs {
                    q: &q,
                    k: &k,
                    v: &v,
                    scale: 0.3,
                };
                let got = causal_attention_on((isa, Default::default()), &args)
                    .unwrap()
                    .expect("fast path");
                let want = causal_attention_slow(&args).unwrap();
                let e = max_excess(&got, &want, tol);
                assert!(
                    e <= 0.0,
                    "{isa:?} {:?} {dtype:?}: exceeds tolerance by {e}",
                    (b, ql, kl, cap, nh, nkv, dh)
                );
            }
        }
    }
}
