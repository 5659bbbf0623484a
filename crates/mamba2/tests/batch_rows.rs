//! `mamba2::batch`: rows joining and leaving a batched state. A batched step over stacked rows
//! must give each row the logits and state it gets alone; selecting rows must give back exactly
//! the rows' states; mismatched inputs are typed errors.

use candle_core::{DType, Device, Tensor};
use mamba2::{batch, pipeline::load_model, Error, Mamba2Cache, Mamba2Config, Mamba2Model};
use std::path::Path;

fn model() -> Mamba2Model {
    let mut cfg = Mamba2Config::preset("130m").unwrap();
    cfg.n_layer = 2;
    cfg.d_model = 64;
    cfg.d_inner = 128;
    cfg.nheads = 4;
    cfg.headdim = 32;
    cfg.d_state = 16;
    cfg.ngroups = 2;
    cfg.vocab_size = 97;
    cfg.pad_vocab_size_multiple = 1;
    Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 11).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn prefilled(model: &Mamba2Model, prompt: &[u32]) -> Mamba2Cache {
    let mut c = model.new_cache(1).unwrap();
    let ids = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model.prefill(&ids, &mut c).unwrap();
    c
}

fn assert_same_state(a: &Mamba2Cache, b: &Mamba2Cache, tol: f32, what: &str) {
    assert_eq!(a.batch(), b.batch(), "{what}: batch");
    for i in 0..a.n_layer() {
        let (dc, ds) = (
            max_diff(a.conv_state(i), b.conv_state(i)),
            max_diff(a.ssm_state(i), b.ssm_state(i)),
        );
        assert!(
            dc <= tol && ds <= tol,
            "{what}: block {i}: conv {dc}, ssm {ds}"
        );
    }
}

#[test]
fn batched_steps_equal_single_steps_with_rows_joining_and_leaving() {
    let m = model();
    let prompts: [&[u32]; 3] = [&[1, 2, 3, 4, 5, 6, 7], &[9, 8], &[40, 41, 42, 43]];
    let mut alone: Vec<Mamba2Cache> = prompts.iter().map(|p| prefilled(&m, p)).collect();
    // Rows 0 and 1 decode together for two steps, then row 2 joins, then row 0 leaves.
    let mut batch_cache = batch::concat_rows(&[&alone[0], &alone[1]]).unwrap();
    let mut rows = vec![0usize, 1];
    let schedule: [(&[u32], Option<usize>, Option<usize>); 5] = [
        (&[10, 20], None, None),
        (&[11, 21], Some(2), None),
        (&[12, 22, 30], None, None),
        (&[13, 23, 31], None, Some(0)),
        (&[24, 32], None, None),
    ];
    for (step, (ids, join, leave)) in schedule.iter().enumerate() {
        let logits = m
            .step(&Tensor::new(*ids, &Device::Cpu).unwrap(), &mut batch_cache)
            .unwrap(); // (rows, vocab)
        for (r, (&seq, &id)) in rows.iter().zip(ids.iter()).enumerate() {
            let one = m
                .step(&Tensor::new(&[id], &Device::Cpu).unwrap(), &mut alone[seq])
                .unwrap();
            let d = max_diff(&logits.narrow(0, r, 1).unwrap(), &one);
            assert!(
                d <= 1e-5,
                "step {step}, sequence {seq}: logits differ by {d}"
            );
            let row = batch::select_rows(&batch_cache, &[r]).unwrap();
            assert_same_state(&row, &alone[seq], 1e-5, &format!("step {step} seq {seq}"));
        }
        if let Some(j) = join {
            batch_cache = batch::concat_rows(&[&batch_cache, &alone[*j]]).unwrap();
            rows.push(*j);
        }
        if let Some(l) = leave {
            let keep: Vec<usize> = (0..rows.len()).filter(|&r| rows[r] != *l).collect();
            batch_cache = batch::select_rows(&batch_cache, &keep).unwrap();
            rows.retain(|s| s != l);
        }
    }
    assert_eq!(rows, vec![1, 2]);
}

#[test]
fn select_rows_copies_exactly_and_in_order() {
    let m = model();
    let a = prefilled(&m, &[1, 2, 3]);
    let b = prefilled(&m, &[4, 5, 6, 7, 8]);
    let c = prefilled(&m, &[60]);
    let all = batch::concat_rows(&[&a, &b, &c]).unwrap();
    assert_eq!(all.batch(), 3);
    assert_eq!(all.seqlen_offset(), 5);
    let picked = batch::select_rows(&all, &[2, 0]).unwrap();
    assert_same_state(&batch::select_rows(&picked, &[0]).unwrap(), &c, 0.0, "c");
    assert_same_state(&batch::select_rows(&picked, &[1]).unwrap(), &a, 0.0, "a");
    let run = batch::select_rows(&all, &[1, 2]).unwrap();
    assert_same_state(
        &run,
        &batch::concat_rows(&[&b, &c]).unwrap(),
        0.0,
        "narrowed run",
    );
    // The copy is independent: stepping it leaves the source unchanged.
    let mut stepped = batch::select_rows(&all, &[0]).unwrap();
    m.step(&Tensor::new(&[3u32], &Device::Cpu).unwrap(), &mut stepped)
        .unwrap();
    assert_same_state(&batch::select_rows(&all, &[0]).unwrap(), &a, 0.0, "source");
    let bytes = batch::state_bytes(&a);
    assert_eq!(batch::state_bytes(&all), 3 * bytes);
    let cfg = m.config();
    let per_block = 4 * (cfg.conv_dim() * cfg.d_conv + cfg.nheads * cfg.headdim * cfg.d_state);
    assert_eq!(bytes, cfg.n_layer * per_block);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let m = model();
    let a = prefilled(&m, &[1, 2]);
    assert!(matches!(
        batch::concat_rows(&[]),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        batch::select_rows(&a, &[]),
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        batch::select_rows(&a, &[1]),
        Err(Error::InvalidInput(_))
    ));
    let mut other = m.config().clone();
    other.n_layer = 1;
    let small = Mamba2Model::random(&other, DType::F32, &Device::Cpu, 3).unwrap();
    let b = small.new_cache(1).unwrap();
    assert!(matches!(
        batch::concat_rows(&[&a, &b]),
        Err(Error::InvalidInput(_))
    ));
}

#[test]
fn hybrid_rows_batch_only_at_equal_kv_length() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/hybrid/granite_nope_tied_b2/hf");
    let files = mamba2::hub::resolve_model(dir.to_str().unwrap(), &Default::default()).unwrap();
    let m = load_model(&files, DType::F32, &Device::Cpu).unwrap();
    assert!(m.config().n_kv_blocks() > 0);
    let a = prefilled(&m, &[1, 2, 3]);
    let b = prefilled(&m, &[7, 8, 9]);
    let short = prefilled(&m, &[5]);
    assert!(matches!(
        batch::concat_rows(&[&a, &short]),
        Err(Error::InvalidInput(_))
    ));
    // Equal lengths batch: the stacked step equals the single ones, KV caches included.
    let mut both = batch::concat_rows(&[&a, &b]).unwrap();
    let logits = m
        .step(&Tensor::new(&[4u32, 10], &Device::Cpu).unwrap(), &mut both)
        .unwrap();
    for (r, (mut alone, id)) in [(a, 4u32), (b, 10)].into_iter().enumerate() {
        let one = m
            .step(&Tensor::new(&[id], &Device::Cpu).unwrap(), &mut alone)
            .unwrap();
        assert!(max_diff(&logits.narrow(0, r, 1).unwrap(), &one) <= 1e-5);
        let row = batch::select_rows(&both, &[r]).unwrap();
        assert_same_state(&row, &alone, 1e-5, "hybrid row");
        for i in 0..row.n_kv() {
            assert_eq!(row.kv(i).len(), 4);
            let d = max_diff(
                &row.kv(i).keys().unwrap().unwrap(),
                &alone.kv(i).keys().unwrap().unwrap(),
            );
            assert!(d <= 1e-5, "kv {i}: {d}");
        }
    }
}
