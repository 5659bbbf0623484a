//! The hybrid-model ops (attention, rotary embedding, MLP activations) through their public
//! entry points on a real Metal device (the kernels of `attention.metal`, `rotary.metal`,
//! `activation.metal` where the dispatch's preconditions hold) against the references on the
//! CPU. Needs Apple hardware:
//! `cargo test -p mamba2-ops --features metal --test metal_device_hybrid -- --ignored`.
//! On Linux these tests compile (clippy's `--all-targets`) but are ignored.

#[path = "metal_common.rs"]
mod metal_common;

use candle_core::{Device, Tensor};
use mamba2_ops::metal_params::AttentionShape;
use mamba2_ops::*;
use metal_common::*;
use rand::{rngs::StdRng, SeedableRng};

fn metal() -> Device {
    Device::new_metal(0).expect("these tests need a Metal device (run them on a Mac)")
}

fn on(t: &Tensor, dev: &Device) -> Tensor {
    t.to_device(dev).unwrap()
}

fn cpu(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu).unwrap()
}

#[test]
#[ignore = "needs a Metal device"]
fn attention_on_metal() {
    let dev = metal();
    // (batch, q_len, kv_len, heads, kv heads, head_dim): decode without and with key splits,
    // speculative tokens, prefill, continued prefill, head_dim 256, and head_dim 36 with 12
    // queries (the decode kernel) and 320 (the reference)
    let shapes = [
        (1, 1, 40, 32, 8, 128),
        (1, 1, 1000, 32, 8, 128),
        (3, 2, 150, 8, 2, 128),
        (1, 50, 50, 32, 8, 128),
        (3, 20, 45, 6, 3, 80),
        (1, 9, 21, 4, 2, 256),
        (2, 12, 30, 4, 2, 36),
        (1, 3, 10, 2, 1, 320),
    ];
    for dtype in DTYPES {
        let mut rng = StdRng::seed_from_u64(4);
        for (b, q_len, kv_len, nh, nkv, hd) in shapes {
            let shape = AttentionShape {
                batch: b,
                q_len,
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                kv_len,
            };
            let what = format!(
                "attention on metal {dtype:?} {shape:?} {:?}",
                shape.launch()
            );
            let q = rand_t(&mut rng, &[b, q_len, nh, hd], 4.0, dtype);
            // caches with room for 8 more positions, read through narrowed views
            let kc = rand_t(&mut rng, &[b, kv_len + 8, nkv, hd], 1.0, dtype);
            let vc = rand_t(&mut rng, &[b, kv_len + 8, nkv, hd], 1.0, dtype);
            let view = |c: &Tensor| c.narrow(1, 0, kv_len).unwrap();
            let scale = (hd as f64).powf(-0.5);
            let (k, v) = (view(&kc), view(&vc));
            let want = causal_attention_slow(&AttentionArgs {
                q: &q,
                k: &k,
                v: &v,
                scale,
            })
            .unwrap();
            let (kcm, vcm) = (on(&kc, &dev), on(&vc, &dev));
            let (km, vm) = (view(&kcm), view(&vcm));
            let got = causal_attention(&AttentionArgs {
                q: &on(&q, &dev),
                k: &km,
                v: &vm,
                scale,
            })
            .unwrap();
            assert_close(&cpu(&got), &want, dtype, &what);
        }
    }
}

#[test]
#[ignore = "needs a Metal device"]
fn rotary_and_activations_on_metal() {
    let dev = metal();
    for dtype in DTYPES {
        let mut rng = StdRng::seed_from_u64(5);
        // Bamba-like partial rotary on heads 1..=8 of a 10-head projection (a strided view),
        // Falcon-H1-like full rotary at a large position with theta 1e11
        let parent = rand_t(&mut rng, &[2, 3, 10, 128], 2.0, dtype);
        let pm = on(&parent, &dev);
        for (rd, offset, theta) in [(64, 4093, 1e4), (128, 70_000, 1e11)] {
            let args = |x| RotaryArgs {
                x,
                position_offset: offset,
                rotary_dim: rd,
                theta,
            };
            let x = parent.narrow(2, 1, 8).unwrap();
            let want = rotary_embedding_slow(&args(&x)).unwrap();
            let got = rotary_embedding(&args(&pm.narrow(2, 1, 8).unwrap())).unwrap();
            assert_close(&cpu(&got), &want, dtype, "rotary on metal");
        }
        let x = rand_t(&mut rng, &[2, 3, 2 * 1000], 6.0, dtype);
        let got = swiglu(&on(&x, &dev)).unwrap();
        assert_close(
            &cpu(&got),
            &swiglu_slow(&x).unwrap(),
            dtype,
            "swiglu on metal",
        );
        let got = relu_squared(&on(&x, &dev)).unwrap();
        let want = relu_squared_slow(&x).unwrap();
        assert_close(&cpu(&got), &want, dtype, "relu² on metal");
        assert_eq!(got.dtype(), dtype);
    }
}
