//! Every kernel family this CPU can run against a plain f64 dot product, on sizes around
//! the vector widths (the public op's tests cover the dispatch; these cover the ISAs the
//! dispatcher would not pick here).

use super::*;
use candle_core::DType;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn check<T: Kernels>(isa: Isa, w: &[T], x: &[f32], (rows, k, out_f): (usize, usize, usize)) {
    let mut out = OutVec::new(DType::F32, rows * out_f).unwrap();
    run(
        (isa, Prefetch::default()),
        w,
        x,
        (rows, k, out_f),
        None,
        (&mut out, 0),
    );
    let OutVec::F32(y) = out else { unreachable!() };
    let wf = widen_all(w);
    for r in 0..rows {
        for o in 0..out_f {
            let want: f64 = (0..k)
                .map(|i| x[r * k + i] as f64 * wf[o * k + i] as f64)
                .sum();
            let got = y[r * out_f + o] as f64;
            assert!(
                (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                "{isa:?} rows {rows} k {k} out {out_f}: y[{r}][{o}] = {got}, want {want}"
            );
        }
    }
}

#[test]
fn every_isa_matches_f64_dot() {
    let mut seed = 7;
    for isa in Isa::available() {
        for &(rows, k, out_f) in &[
            (1, 1, 1),
            (1, 7, 3),
            (2, 15, 5),
            (3, 16, 4),
            (4, 17, 33),
            (5, 31, 9),
            (7, 33, 66),
            (16, 100, 37),
            (1, 768, 70),
            (37, 19, 70),
            (64, 100, 50),
            (33, 768, 97),
            (300, 45, 13),
            (3, 2048, 5),
        ] {
            let x: Vec<f32> = (0..rows * k).map(|_| lcg(&mut seed)).collect();
            let w: Vec<f32> = (0..out_f * k).map(|_| lcg(&mut seed)).collect();
            check(isa, &w, &x, (rows, k, out_f));
            let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            check(isa, &wh, &x, (rows, k, out_f));
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            check(isa, &wb, &x, (rows, k, out_f));
        }
    }
}
