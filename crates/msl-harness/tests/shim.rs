//! The shim's library surface compiles (strict pass included) and computes
//! what MSL specifies, in checked mode.

use msl_harness::{Library, Mode};

#[test]
fn shim_surface() {
    let lib = Library::compile(&[format!(
        "{}/tests/kernels/shim.metal",
        env!("CARGO_MANIFEST_DIR")
    )])
    .unwrap();
    let mut out = vec![f32::NAN; 32 * 32];
    let mut counters = vec![0u32; 3];
    let mut icounters = vec![0i32; 1];
    lib.kernel("shim_surface")
        .unwrap()
        .buffer(0, &mut out)
        .buffer(1, &mut counters)
        .buffer(2, &mut icounters)
        .grid([1, 1, 1])
        .threadgroup([32, 1, 1])
        .mode(Mode::Checked)
        .dispatch()
        .unwrap();
    let xs: Vec<f32> = (0..32).map(|l| l as f32 * 0.25 - 2.0).collect();
    for lane in 0..32usize {
        let o = &out[lane * 32..lane * 32 + 32];
        let x = xs[lane];
        let close = |a: f32, b: f32, tol: f32| (a - b).abs() <= tol * (1.0 + b.abs());
        assert!(close(o[0], x.exp(), 1e-6), "exp {}", o[0]);
        assert!(
            close(o[1], half::f16::from_f32(x).to_f32().exp(), 1e-3),
            "exp(half) {}",
            o[1]
        );
        assert_eq!(o[2], x.clamp(-1.0, 1.0));
        assert_eq!(o[3], 2.5);
        assert_eq!(o[4], x * 2.0 + 1.0);
        assert_eq!(o[5], if x > 0.0 { 2.0 } else { 1.0 });
        assert_eq!(o[6], x);
        assert_eq!(o[7], x + 6.0);
        assert_eq!(o[8], 5.0);
        assert_eq!(o[9], (lane as f32).max(7.0));
        assert_eq!(o[10], (lane as u32 + 1).leading_zeros() as f32);
        assert_eq!(o[11], (lane as u32).count_ones() as f32);
        assert_eq!(o[12], 16.0);
        assert_eq!(o[13], -2.0);
        assert_eq!(o[14], 256.0);
        assert_eq!(o[15], 31.0);
        assert_eq!(o[16], 0.0); // each bit set by 4 lanes
        assert_eq!(o[17], xs[5]);
        assert_eq!(o[18], xs[0]);
        assert_eq!(
            o[19],
            (0..16)
                .filter(|l| l % 3 == 0)
                .map(|l| 1u32 << l)
                .sum::<u32>() as f32
        );
        assert_eq!((o[20], o[21]), (1.0, 1.0));
        assert_eq!(o[22], xs[lane ^ 1]);
        assert_eq!(o[23], xs[(lane + 3) % 32]);
        assert_eq!(o[24], (lane + 1) as f32);
        assert_eq!(o[25], if lane == 0 { 1.0 } else { 0.0 });
        assert_eq!(o[26], 32.0);
        assert!(close(o[27], x.tanh() + 4.0, 1e-6), "{}", o[27]);
        assert_eq!(o[28], 65505.0);
        assert_eq!(o[29], 1.0);
        // prod = (2I) J = 2J, then J (2I) + 2J = 4J: every element is 4
        assert_eq!(o[31], 8.0);
    }
    assert_eq!(counters[0], 31);
    assert_eq!(counters[1], 1, "only the first compare-exchange succeeds");
    assert_eq!(icounters[0], -32);
    // exchanges return the previous value: the initial 0, then every lane's
    // value but the last one's, which stays in memory
    let mut seen: Vec<u32> = (0..32).map(|l| out[l * 32 + 30] as u32).collect();
    seen.push(counters[2]);
    seen.sort_unstable();
    let want: Vec<u32> = std::iter::once(0).chain(0..32).collect();
    assert_eq!(seen, want);
}
