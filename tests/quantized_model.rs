//! Models with block-quantized weight matrices (quantized at load): one-shot prefill = split
//! prefill = token-by-token decode for logits and states, the logits stay close to the f32
//! model's (by how much depends on the format), the weight bytes per token shrink as the format
//! says, and the norms / conv / A / D / dt stay unquantized.

mod common;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use mamba2::{Mamba2Config, Mamba2Model};

/// A config whose projections are whole K-quant blocks (rows of 256).
fn config() -> Mamba2Config {
    let mut c = Mamba2Config::preset("130m").unwrap();
    c.d_model = 256;
    c.n_layer = 2;
    c.headdim = 64;
    c.nheads = 8;
    c.d_inner = 512;
    c.expand = 2;
    c.ngroups = 2;
    c.d_state = 16;
    c.chunk_size = 8;
    c.vocab_size = 120;
    c.pad_vocab_size_multiple = 8;
    c.validate().unwrap();
    c
}

fn ids(batch: usize, seq: usize, vocab: usize) -> Tensor {
    let v: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 37 + 11) % vocab) as u32)
        .collect();
    Tensor::from_vec(v, (batch, seq), &Device::Cpu).unwrap()
}

fn rms(t: &Tensor) -> f32 {
    t.sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn quantized_prefill_split_prefill_and_decode_agree() {
    let c = config();
    for ty in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        let model =
            Mamba2Model::random_quantized(&c, DType::F32, &Device::Cpu, 5, Some(ty)).unwrap();
        assert_eq!(model.quantization(), Some(ty));
        let (batch, seq) = (2, 13);
        let x = ids(batch, seq, c.vocab_size);
        let mut one = model.new_cache(batch).unwrap();
        let full = model.forward(&x, Some(&mut one)).unwrap(); // (batch, seq, vocab_rows)

        let mut split = model.new_cache(batch).unwrap();
        let a = model
            .forward(&x.narrow(1, 0, 5).unwrap(), Some(&mut split))
            .unwrap();
        let b = model
            .forward(&x.narrow(1, 5, seq - 5).unwrap(), Some(&mut split))
            .unwrap();
        let joined = Tensor::cat(&[a, b], 1).unwrap();
        // The same quantized kernels on the same rows: only the scan's chunking differs.
        assert!(max_abs_diff(&full, &joined) < 1e-4, "{ty:?}: split prefill");

        // Prefill multiplies by the exactly dequantized weights; decode rounds each activation
        // row to 8-bit blocks first (as llama.cpp does). So decode follows prefill within the
        // effect of that rounding: a few percent of the logits' scale on this random model.
        let mut step = model.new_cache(batch).unwrap();
        for t in 0..seq {
            let l = model
                .step(&x.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), &mut step)
                .unwrap();
            let want = full.narrow(1, t, 1).unwrap().squeeze(1).unwrap(); // (batch, vocab_rows)
            assert!(
                max_abs_diff(&l, &want) > 0.0,
                "{ty:?}: decode did not round activations"
            );
            let d = rms(&(&l - &want).unwrap()) / rms(&want);
            assert!(d < 0.1, "{ty:?}: decode token {t}: relative RMS {d}");
        }
        // States: the relative RMS of the difference.
        let rel = |a: &Tensor, b: &Tensor| rms(&(a - b).unwrap()) / rms(a);
        for i in 0..one.n_layer() {
            let (ds, dc) = (
                rel(one.ssm_state(i), step.ssm_state(i)),
                rel(one.conv_state(i), step.conv_state(i)),
            );
            assert!(
                ds < 0.1 && dc < 0.1,
                "{ty:?} layer {i}: ssm {ds}, conv {dc}"
            );
            // Split prefill took the same exact path as the one-shot prefill.
            assert!(max_abs_diff(one.ssm_state(i), split.ssm_state(i)) < 1e-4);
        }
    }
}

#[test]
fn quantized_logits_stay_close_to_the_f32_model() {
    let c = config();
    let dense = Mamba2Model::random(&c, DType::F32, &Device::Cpu, 9).unwrap();
    let x = ids(1, 24, c.vocab_size);
    let want = dense.forward(&x, None).unwrap();
    let scale = rms(&want);
    // Relative RMS error of the logits, per format: weight rounding (Q8_0 ~0.3 %, Q6_K ~1 %,
    // Q5_K ~2 %, Q4_K ~4 % per weight) plus the activations' 8-bit rounding, through 2 layers.
    for (ty, tol) in [
        (GgmlDType::Q8_0, 0.06),
        (GgmlDType::Q6K, 0.1),
        (GgmlDType::Q5K, 0.15),
        (GgmlDType::Q4K, 0.3),
        (GgmlDType::Q4_0, 0.4),
    ] {
        let q = Mamba2Model::random_quantized(&c, DType::F32, &Device::Cpu, 9, Some(ty)).unwrap();
        let got = q.forward(&x, None).unwrap();
        let err = rms(&(&got - &want).unwrap()) / scale;
        assert!(err < tol, "{ty:?}: relative RMS error {err} >= {tol}");
        assert!(
            err > 0.0,
            "{ty:?}: identical logits: the weights were not quantized"
        );
        // bf16 activations on the same blocks.
        let qb = Mamba2Model::random_quantized(&c, DType::BF16, &Device::Cpu, 9, Some(ty)).unwrap();
        let gb = qb.forward(&x, None).unwrap();
        let err_b = rms(&(&gb - &want).unwrap()) / scale;
        assert!(
            err_b < tol + 0.03,
            "{ty:?} bf16: relative RMS error {err_b}"
        );
    }
}

#[test]
fn weight_bytes_follow_the_format() {
    let c = config();
    let dense = Mamba2Model::random(&c, DType::F32, &Device::Cpu, 1).unwrap();
    let q8 = Mamba2Model::random_quantized(&c, DType::F32, &Device::Cpu, 1, Some(GgmlDType::Q8_0))
        .unwrap();
    let q4 = Mamba2Model::random_quantized(&c, DType::F32, &Device::Cpu, 1, Some(GgmlDType::Q4K))
        .unwrap();
    assert_eq!(q8.num_parameters(), dense.num_parameters());
    // Matrices: in_proj (d_in_proj x 256), out_proj (256 x 512) per layer, the tied head (rows x 256).
    let d_in_proj = 2 * c.d_inner + 2 * c.ngroups * c.d_state + c.nheads;
    let matrices = c.n_layer * (d_in_proj * 256 + 256 * 512) + dense.vocab_rows() * 256;
    let small = dense.weight_bytes_per_token() - 4 * matrices; // norms, conv, A, D, dt in f32
    assert_eq!(q8.weight_bytes_per_token(), small + matrices / 32 * 34);
    assert_eq!(q4.weight_bytes_per_token(), small + matrices / 256 * 144);
    assert_eq!(dense.quantization(), None);
}

#[test]
fn rows_that_are_not_whole_blocks_stay_dense() {
    // d_model 48: not a multiple of 256, so Q4_K leaves every matrix in the model dtype.
    let mut c = Mamba2Config::preset("130m").unwrap();
    c.d_model = 48;
    c.n_layer = 1;
    c.headdim = 16;
    c.nheads = 6;
    c.d_inner = 96;
    c.d_state = 16;
    c.vocab_size = 50;
    c.pad_vocab_size_multiple = 1;
    c.validate().unwrap();
    let q = Mamba2Model::random_quantized(&c, DType::F32, &Device::Cpu, 1, Some(GgmlDType::Q4K))
        .unwrap();
    let d = Mamba2Model::random(&c, DType::F32, &Device::Cpu, 1).unwrap();
    assert_eq!(q.quantization(), None);
    let x = ids(1, 7, 50);
    assert_eq!(
        max_abs_diff(&q.forward(&x, None).unwrap(), &d.forward(&x, None).unwrap()),
        0.0
    );
}
