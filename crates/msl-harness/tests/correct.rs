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
