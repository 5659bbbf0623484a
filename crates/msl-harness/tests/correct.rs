//! Correct kernels give the right answers in every mode.

use msl_harness::{Library, Mode};

const MODES: [Mode; 4] = [
    Mode::InOrder,
    Mode::Shuffled { seed: 7 },
    Mode::Checked,
    Mode::CheckedShuffled { seed: 3 },
];

fn kernels(name: &str) -> String {
    format!("{}/tests/kernels/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn reduction_with_simd_sum() {
    let lib = Library::compile(&[kernels("reduce.metal")]).unwrap();
    // 200 threads: the last simdgroup is partial (8 lanes)
    for (mode, tg, n) in [
        (MODES[0], 256, 1000u32),
        (MODES[1], 200, 777),
        (MODES[2], 200, 333),
        (MODES[3], 64, 64),
    ] {
        let input: Vec<f32> = (0..n).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let mut out = vec![f32::NAN; 1];
        lib.kernel("reduce_sum_f32")
            .unwrap()
            .input(0, &input)
            .buffer(1, &mut out)
            .bytes(2, &n)
            .grid([1, 1, 1])
            .threadgroup([tg, 1, 1])
            .mode(mode)
            .dispatch()
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        let want: f32 = input.iter().sum();
        assert_eq!(out[0], want, "{mode:?} tg={tg} n={n}");
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct GemmParams {
    m: u32,
    n: u32,
    k: u32,
}
unsafe impl msl_harness::Pod for GemmParams {}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn matmul(a: &[f32], b: &[f32], m: usize, n: usize, k: usize, a_transposed: bool) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|l| if a_transposed { a[l * m + i] } else { a[i * k + l] } * b[l * n + j]).sum();
        }
    }
    c
}

#[test]
fn simdgroup_matrix_gemm() {
    let lib = Library::compile(&[kernels("gemm.metal")]).unwrap();
    let (m, n, k) = (16usize, 24usize, 32usize);
    let p = GemmParams {
        m: m as u32,
        n: n as u32,
        k: k as u32,
    };
    let a = values(m * k, 1);
    let b = values(k * n, 2);
    for (name, mode) in [
        ("gemm_simdgroup_f32", Mode::InOrder),
        ("gemm_simdgroup_f32", Mode::Checked),
        ("gemm_at_b_f32", Mode::Shuffled { seed: 4 }),
    ] {
        let transposed = name == "gemm_at_b_f32";
        let mut c = vec![f32::NAN; m * n];
        lib.kernel(name)
            .unwrap()
            .input(0, &a)
            .input(1, &b)
            .buffer(2, &mut c)
            .bytes(3, &p)
            .grid([(n / 8) as u32, (m / 8) as u32, 1])
            .threadgroup([32, 1, 1])
            .mode(mode)
            .dispatch()
            .unwrap_or_else(|e| panic!("{name} {mode:?}: {e}"));
        let want = matmul(&a, &b, m, n, k, transposed);
        for (i, (g, w)) in c.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{name} {mode:?} [{i}]: {g} vs {w}"
            );
        }
    }
    // half inputs, float accumulation
    let ah: Vec<half::f16> = a.iter().map(|&v| half::f16::from_f32(v)).collect();
    let bh: Vec<half::f16> = b.iter().map(|&v| half::f16::from_f32(v)).collect();
    let mut c = vec![f32::NAN; m * n];
    lib.kernel("gemm_simdgroup_f16")
        .unwrap()
        .input(0, &ah)
        .input(1, &bh)
        .buffer(2, &mut c)
        .bytes(3, &p)
        .grid([(n / 8) as u32, (m / 8) as u32, 1])
        .threadgroup([32, 1, 1])
        .dispatch()
        .unwrap();
    let af: Vec<f32> = ah.iter().map(|v| v.to_f32()).collect();
    let bf: Vec<f32> = bh.iter().map(|v| v.to_f32()).collect();
    let want = matmul(&af, &bf, m, n, k, false);
    for (g, w) in c.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
            "f16 gemm: {g} vs {w}"
        );
    }
}

#[test]
fn half_and_bfloat_round_every_operation() {
    use half::{bf16, f16};
    let lib = Library::compile(&[kernels("lowp.metal")]).unwrap();
    let n = 1024;
    let (a, b, c) = (values(n, 3), values(n, 4), values(n, 5));

    let h = |v: &[f32]| {
        v.iter()
            .map(|&x| f16::from_f32(x * 8.0))
            .collect::<Vec<_>>()
    };
    let (ah, bh, ch) = (h(&a), h(&b), h(&c));
    let mut out = vec![f16::NAN; n];
    lib.kernel("fma_chain_f16")
        .unwrap()
        .input(0, &ah)
        .input(1, &bh)
        .input(2, &ch)
        .buffer(3, &mut out)
        .threads([n as u32, 1, 1])
        .threadgroup([64, 1, 1])
        .dispatch()
        .unwrap();
    let r = |x: f32| f16::from_f32(x).to_f32();
    let mut single_rounding_differs = 0;
    for i in 0..n {
        let (x, y, z) = (ah[i].to_f32(), bh[i].to_f32(), ch[i].to_f32());
        let t = r(r(x * y) + z);
        let want = f16::from_f32(r(t * t) - x);
        assert_eq!(
            out[i].to_bits(),
            want.to_bits(),
            "f16 [{i}]: {} vs {}",
            out[i],
            want
        );
        let t1 = x * y + z;
        if f16::from_f32(t1 * t1 - x) != want {
            single_rounding_differs += 1;
        }
    }
    // the inputs are chosen so that rounding only at the end would be caught
    assert!(single_rounding_differs > 10, "{single_rounding_differs}");

    let bfv = |v: &[f32]| {
        v.iter()
            .map(|&x| bf16::from_f32(x * 8.0))
            .collect::<Vec<_>>()
    };
    let (ab, bb, cb) = (bfv(&a), bfv(&b), bfv(&c));
    let mut out = vec![bf16::NAN; n];
    lib.kernel("fma_chain_bf16")
        .unwrap()
        .input(0, &ab)
        .input(1, &bb)
        .input(2, &cb)
        .buffer(3, &mut out)
        .threads([n as u32, 1, 1])
        .threadgroup([64, 1, 1])
        .mode(Mode::Shuffled { seed: 2 })
        .dispatch()
        .unwrap();
    let rb = |x: f32| bf16::from_f32(x).to_f32();
    for i in 0..n {
        let (x, y, z) = (ab[i].to_f32(), bb[i].to_f32(), cb[i].to_f32());
        let t = rb(rb(x * y) + z);
        let want = bf16::from_f32(rb(t * t) - x);
        assert_eq!(
            out[i].to_bits(),
            want.to_bits(),
            "bf16 [{i}]: {} vs {}",
            out[i],
            want
        );
    }

    // vector constructors convert, never bit-cast
    let x: Vec<f16> = (0..16 * 4).map(|i| f16::from_f32(i as f32 * 0.5)).collect();
    let mut out = vec![f32::NAN; 16];
    lib.kernel("half4_dot")
        .unwrap()
        .input(0, &x)
        .buffer(1, &mut out)
        .grid([1, 1, 1])
        .threadgroup([16, 1, 1])
        .dispatch()
        .unwrap();
    for i in 0..16 {
        let want: f32 = (0..4).map(|j| x[i * 4 + j].to_f32() * (j + 1) as f32).sum();
        assert_eq!(out[i], want);
    }
}

#[test]
fn simd_prefix_shuffle_max_with_partial_simdgroup() {
    let lib = Library::compile(&[kernels("lowp.metal")]).unwrap();
    let n = 48; // simdgroup 1 has 16 lanes
    let input: Vec<u32> = (0..n as u32).map(|i| (i * 7) % 13).collect();
    let (mut excl, mut down, mut maxv) = (vec![0u32; n], vec![0u32; n], vec![0f32; n]);
    lib.kernel("scan_and_shuffle")
        .unwrap()
        .input(0, &input)
        .buffer(1, &mut excl)
        .buffer(2, &mut down)
        .buffer(3, &mut maxv)
        .grid([1, 1, 1])
        .threadgroup([n as u32, 1, 1])
        .mode(Mode::Checked)
        .dispatch()
        .unwrap();
    for i in 0..n {
        let (sg0, lane) = (i / 32 * 32, i % 32);
        let end = (sg0 + 32).min(n);
        assert_eq!(excl[i], input[sg0..i].iter().sum::<u32>(), "excl[{i}]");
        let want_down = if lane == 31 {
            input[i] // upper lane keeps its value
        } else if i + 1 < end {
            input[i + 1]
        } else {
            u32::MAX // inactive source lane: poison
        };
        assert_eq!(down[i], want_down, "down[{i}]");
        assert_eq!(
            maxv[i],
            *input[sg0..end].iter().max().unwrap() as f32,
            "max[{i}]"
        );
    }
}
