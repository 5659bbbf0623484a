//! Execution modes: in-order is deterministic, shuffled permutes thread and
//! threadgroup order reproducibly from its seed.

use msl_harness::{Library, Mode};

fn order(lib: &Library, mode: Mode) -> Vec<u32> {
    let threads = 4 * 64;
    let mut ticket = vec![0u32; 1];
    let mut order = vec![u32::MAX; 2 * threads];
    lib.kernel("execution_order")
        .unwrap()
        .buffer(0, &mut ticket)
        .buffer(1, &mut order)
        .grid([4, 1, 1])
        .threadgroup([64, 1, 1])
        .mode(mode)
        .dispatch()
        .unwrap();
    assert_eq!(ticket[0] as usize, 2 * threads);
    order
}

#[test]
fn shuffled_order_is_a_seeded_permutation() {
    let lib = Library::compile(&[format!(
        "{}/tests/kernels/modes.metal",
        env!("CARGO_MANIFEST_DIR")
    )])
    .unwrap();
    let in_order = order(&lib, Mode::InOrder);
    // threadgroups one at a time; within one, everyone reaches the barrier first
    let want: Vec<u32> = (0..4u32)
        .flat_map(|g| (g * 64..g * 64 + 64).chain(256 + g * 64..256 + g * 64 + 64))
        .collect();
    assert_eq!(in_order, want);
    let a = order(&lib, Mode::Shuffled { seed: 1 });
    let b = order(&lib, Mode::Shuffled { seed: 2 });
    assert_eq!(
        a,
        order(&lib, Mode::Shuffled { seed: 1 }),
        "same seed, same order"
    );
    assert_ne!(a, in_order);
    assert_ne!(a, b);
    let mut sorted = a.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..512).collect::<Vec<_>>());
    // threadgroup order is shuffled too: the first thread to run is not in group 0 for some seed
    assert!((1..20).any(|s| order(&lib, Mode::Shuffled { seed: s })[0] >= 64));
    // each group still runs all its threads to the barrier before any passes it
    for g in a.chunks(128) {
        let group = g[0] % 256 / 64;
        assert!(g[..64].iter().all(|&t| t < 256 && t / 64 == group), "{g:?}");
        assert!(
            g[64..].iter().all(|&t| t >= 256 && (t - 256) / 64 == group),
            "{g:?}"
        );
    }
}

#[test]
fn msl_constants_literals_and_select() {
    use half::f16;
    let lib = Library::compile(&[format!(
        "{}/tests/kernels/modes.metal",
        env!("CARGO_MANIFEST_DIR")
    )])
    .unwrap();
    let x: Vec<f16> = (0..100)
        .map(|i| f16::from_f32((i as f32 - 60.0) * 0.25))
        .collect();
    let n = x.len() as u32;
    let mut out = vec![f16::NAN; 2];
    lib.kernel("scaled_row_max_f16")
        .unwrap()
        .input(0, &x)
        .buffer(1, &mut out)
        .bytes(2, &n)
        .grid([1, 1, 1])
        .threadgroup([32, 1, 1])
        .dispatch()
        .unwrap();
    assert_eq!(out[0].to_f32(), 39.0 * 0.25 * 0.5);
    assert_eq!(out[1], f16::MAX);
}

#[test]
fn simd_ops_reconverge_after_divergence() {
    let lib = Library::compile(&[format!(
        "{}/tests/kernels/modes.metal",
        env!("CARGO_MANIFEST_DIR")
    )])
    .unwrap();
    for mode in [Mode::InOrder, Mode::Shuffled { seed: 8 }, Mode::Checked] {
        let mut out = vec![f32::NAN; 32];
        lib.kernel("reconverge")
            .unwrap()
            .buffer(0, &mut out)
            .grid([1, 1, 1])
            .threadgroup([32, 1, 1])
            .mode(mode)
            .dispatch()
            .unwrap();
        for (lane, &v) in out.iter().enumerate() {
            let want = if lane < 8 {
                800.0 + 32.0 + (32.0 + 8.0) * 1000.0
            } else {
                32.0 + 32.0 * 1000.0
            };
            assert_eq!(v, want, "{mode:?} lane {lane}");
        }
    }
}

#[test]
fn local_headers_are_found() {
    let lib = Library::compile(&[format!(
        "{}/tests/kernels/inc/uses_header.metal",
        env!("CARGO_MANIFEST_DIR")
    )])
    .unwrap();
    let mut out = vec![0f32; 8];
    lib.kernel("uses_header")
        .unwrap()
        .buffer(0, &mut out)
        .grid([1, 1, 1])
        .threadgroup([8, 1, 1])
        .dispatch()
        .unwrap();
    assert_eq!(out, (0..8).map(|i| 2.0 * i as f32).collect::<Vec<_>>());
}

#[test]
fn kernels_instantiated_by_macros() {
    let lib = Library::compile(&[format!(
        "{}/tests/kernels/modes.metal",
        env!("CARGO_MANIFEST_DIR")
    )])
    .unwrap();
    let s = 3.0f32;
    let mut x = vec![1.5f32; 4];
    lib.kernel("scale_by_f32")
        .unwrap()
        .buffer(0, &mut x)
        .bytes(1, &s)
        .threads([4, 1, 1])
        .threadgroup([4, 1, 1])
        .dispatch()
        .unwrap();
    assert_eq!(x, [4.5; 4]);
    let mut h = vec![half::f16::from_f32(1.5); 4];
    lib.kernel("scale_by_f16")
        .unwrap()
        .buffer(0, &mut h)
        .bytes(1, &s)
        .threads([4, 1, 1])
        .threadgroup([4, 1, 1])
        .dispatch()
        .unwrap();
    assert!(h.iter().all(|v| v.to_f32() == 4.5));
    let mut b = vec![half::bf16::from_f32(1.5); 4];
    lib.kernel("scale_by_bf16")
        .unwrap()
        .buffer(0, &mut b)
        .bytes(1, &s)
        .threads([4, 1, 1])
        .threadgroup([4, 1, 1])
        .dispatch()
        .unwrap();
    assert!(b.iter().all(|v| v.to_f32() == 4.5));
}

#[test]
fn workspace_relative_paths() {
    // cargo runs tests from crates/msl-harness; the path is relative to the workspace root
    let lib = Library::compile(&["crates/msl-harness/tests/kernels/reduce.metal"]).unwrap();
    assert_eq!(lib.kernel_names(), ["reduce_sum_f32"]);
    let e = Library::compile(&["crates/msl-harness/tests/kernels/missing.metal"])
        .err()
        .unwrap();
    assert!(matches!(e, msl_harness::Error::Io { .. }), "{e}");
}

#[test]
fn non_uniform_grid_has_partial_edge_groups() {
    let lib = Library::compile(&[format!(
        "{}/tests/kernels/modes.metal",
        env!("CARGO_MANIFEST_DIR")
    )])
    .unwrap();
    let (w, h) = (10usize, 3usize);
    let mut out = vec![u32::MAX; w * h];
    let mut sizes = vec![u32::MAX; 3 * 2];
    lib.kernel("grid_coverage")
        .unwrap()
        .buffer(0, &mut out)
        .buffer(1, &mut sizes)
        .threads([w as u32, h as u32, 1])
        .threadgroup([4, 2, 1])
        .mode(Mode::Checked)
        .dispatch()
        .unwrap();
    for y in 0..h {
        for x in 0..w {
            assert_eq!(out[y * w + x], (x + 1000 * y) as u32);
        }
    }
    // 3 x 2 groups of 4x2; the last column is 2 wide, the last row 1 high
    assert_eq!(sizes, [42, 42, 22, 41, 41, 21]);
}
