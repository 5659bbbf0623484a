//! Invariance of the hybrid models (attention + Mamba-2 + MLP blocks): one-shot prefill = split
//! prefill = token-by-token decode = prefill in bounded pieces = save/restore, for the logits
//! and for every state (SSM states and KV caches). Runs on the HF fixture checkpoints of every
//! family (tests/fixtures/hybrid), whose absolute accuracy tests/hybrid_fixtures.rs checks.

mod common;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::max_abs_diff;
use mamba2::session::{CancelToken, GenerateOptions, Session};
use mamba2::{pipeline::load_model, Error, Mamba2Cache, Mamba2Model};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const TOL: f32 = 2e-5;

fn case_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hybrid")
        .join(name)
}

fn load(name: &str) -> Mamba2Model {
    let dir = case_dir(name).join("hf");
    let files = mamba2::hub::resolve_model(dir.to_str().unwrap(), &Default::default()).unwrap();
    load_model(&files, DType::F32, &Device::Cpu).unwrap()
}

const CASES: [&str; 7] = [
    "bamba_b2",
    "falcon_h1_nonorm_tied_b1",
    "falcon_h1_rmsnorm_g2_b2",
    "granite_nope_tied_b2",
    "granite_rope_untied_limit_b1",
    "nemotron_h_g2_b3",
    "nemotron_h_hd80_b1",
];

fn ids(batch: usize, seq: usize, vocab: usize) -> Tensor {
    let v: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 37 + 11) % vocab) as u32)
        .collect();
    Tensor::from_vec(v, (batch, seq), &Device::Cpu).unwrap()
}

fn assert_states_equal(a: &Mamba2Cache, b: &Mamba2Cache, what: &str) {
    assert_eq!(a.seqlen_offset(), b.seqlen_offset(), "{what}: offsets");
    assert_eq!(
        (a.n_layer(), a.n_kv()),
        (b.n_layer(), b.n_kv()),
        "{what}: slot counts"
    );
    for i in 0..a.n_layer() {
        let ec = max_abs_diff(a.conv_state(i), b.conv_state(i));
        let es = max_abs_diff(a.ssm_state(i), b.ssm_state(i));
        assert!(
            ec <= TOL && es <= TOL,
            "{what}: SSM block {i}: conv {ec}, ssm {es}"
        );
    }
    for j in 0..a.n_kv() {
        let (ka, kb) = (
            a.kv(j).keys().unwrap().unwrap(),
            b.kv(j).keys().unwrap().unwrap(),
        );
        let (va, vb) = (
            a.kv(j).values().unwrap().unwrap(),
            b.kv(j).values().unwrap().unwrap(),
        );
        let (ek, ev) = (max_abs_diff(&ka, &kb), max_abs_diff(&va, &vb));
        assert!(
            ek <= TOL && ev <= TOL,
            "{what}: KV block {j}: k {ek}, v {ev}"
        );
    }
}

/// One-shot prefill, prefill in uneven pieces, token-by-token decode and the bounded-piece
/// `prefill` all give the same logits and the same final states, for every family, batch > 1
/// where the case has it.
#[test]
fn prefill_split_decode_agree_for_every_family() {
    for name in CASES {
        let mut model = load(name);
        let batch = 2;
        let seq = 29;
        let x = ids(batch, seq, model.config().vocab_size);

        let mut one = model.new_cache(batch).unwrap();
        let full = model.forward(&x, Some(&mut one)).unwrap(); // (batch, seq, vocab)

        let mut split = model.new_cache(batch).unwrap();
        let mut parts = Vec::new();
        for (a, b) in [(0, 5), (5, 6), (6, 17), (17, seq)] {
            parts.push(
                model
                    .forward(&x.narrow(1, a, b - a).unwrap(), Some(&mut split))
                    .unwrap(),
            );
        }
        let split_logits = Tensor::cat(&parts, 1).unwrap();
        let e = max_abs_diff(&full, &split_logits);
        assert!(e <= TOL, "{name}: split prefill logits differ by {e}");
        assert_states_equal(&one, &split, &format!("{name} split"));

        let mut steps = model.new_cache(batch).unwrap();
        let mut rows = Vec::new();
        for t in 0..seq {
            rows.push(
                model
                    .step(&x.i((.., t)).unwrap(), &mut steps)
                    .unwrap()
                    .unsqueeze(1)
                    .unwrap(),
            );
        }
        let e = max_abs_diff(&full, &Tensor::cat(&rows, 1).unwrap());
        assert!(e <= TOL, "{name}: token-by-token logits differ by {e}");
        assert_states_equal(&one, &steps, &format!("{name} decode"));

        model.set_max_prefill_tokens(4);
        let mut pieces = model.new_cache(batch).unwrap();
        let last = model.prefill(&x, &mut pieces).unwrap(); // (batch, vocab)
        let e = max_abs_diff(&full.i((.., seq - 1)).unwrap(), &last);
        assert!(e <= TOL, "{name}: bounded-piece prefill differs by {e}");
        assert_states_equal(&one, &pieces, &format!("{name} pieces"));

        // A deep clone continues exactly like the original.
        let fork = one.deep_clone().unwrap();
        let next = ids(batch, 1, model.config().vocab_size).squeeze(1).unwrap();
        let (mut a, mut b) = (one, fork);
        let la = model.step(&next, &mut a).unwrap();
        let lb = model.step(&next, &mut b).unwrap();
        assert_eq!(max_abs_diff(&la, &lb), 0.0, "{name}: deep clone diverged");
    }
}

/// A KV cache that grows past its first buffer (256 positions) keeps every earlier position.
#[test]
fn kv_cache_growth_keeps_positions() {
    let model = load("nemotron_h_hd80_b1");
    let seq = 300;
    let x = ids(1, seq, model.config().vocab_size);
    let full = model.forward(&x, None).unwrap();
    let mut cache = model.new_cache(1).unwrap();
    let a = model
        .forward(&x.narrow(1, 0, 250).unwrap(), Some(&mut cache))
        .unwrap();
    let b = model
        .forward(&x.narrow(1, 250, 50).unwrap(), Some(&mut cache))
        .unwrap();
    let e = max_abs_diff(&full, &Tensor::cat(&[a, b], 1).unwrap());
    assert!(e <= 1e-4, "growth across the buffer changed logits by {e}");
    assert_eq!(cache.kv(0).len(), seq);
}

fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        eos_token_ids: Vec::new(),
        ..Default::default()
    }
}

/// Feeding a conversation turn by turn, with the session saved to a file and restored between
/// turns, gives the logits and states of one prefill of the whole text; greedy continuations
/// then agree token for token. On a model with two attention blocks.
#[test]
fn turn_by_turn_through_save_restore_equals_one_shot() {
    for name in [
        "granite_nope_tied_b2",
        "nemotron_h_g2_b3",
        "falcon_h1_rmsnorm_g2_b2",
    ] {
        let model = Arc::new(load(name));
        let n_attn = model
            .config()
            .blocks()
            .iter()
            .filter(|b| b.kind.has_kv())
            .count();
        assert!(n_attn >= 2, "{name}: {n_attn} attention blocks");
        let vocab = model.config().vocab_size as u32;
        let turns: Vec<Vec<u32>> = vec![
            (0..7).map(|i| (i * 13 + 5) % vocab).collect(),
            (0..4).map(|i| (i * 29 + 3) % vocab).collect(),
            (0..9).map(|i| (i * 17 + 1) % vocab).collect(),
        ];
        let all: Vec<u32> = turns.concat();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chat.session");

        let mut s = Session::new(model.clone()).unwrap();
        for t in &turns {
            s.feed(t).unwrap();
            s.flush().unwrap();
            s.save(&path).unwrap();
            s = Session::load(model.clone(), &path).unwrap();
        }
        let mut one = Session::new(model.clone()).unwrap();
        one.feed(&all).unwrap();
        one.flush().unwrap();
        assert_eq!(s.tokens(), one.tokens());
        let (la, lb) = (s.last_logits().unwrap(), one.last_logits().unwrap());
        let e = la
            .iter()
            .zip(lb)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(e <= TOL, "{name}: turn-by-turn last logits differ by {e}");
        assert_states_equal(s.cache(), one.cache(), &format!("{name} turns"));

        let cancel = CancelToken::new();
        let mut out_a = Vec::new();
        s.generate(&greedy(8), &cancel, |t| {
            out_a.push(t);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        let mut out_b = Vec::new();
        one.generate(&greedy(8), &cancel, |t| {
            out_b.push(t);
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        assert_eq!(out_a, out_b, "{name}: continuations differ");
    }
}

/// Session files: a hybrid's file holds its KV caches; files of the older formats (v1, v2),
/// which carry no weights fingerprint, are refused with a typed error naming both versions.
#[test]
fn session_file_versions() {
    let hybrid = Arc::new(load("bamba_b2"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.session");
    let mut s = Session::new(hybrid.clone()).unwrap();
    s.feed(&[1, 2, 3, 4, 5]).unwrap();
    s.save(&path).unwrap();
    let st = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert_eq!(st["key.0"].dims(), &[1, 5, 1, 16]);
    assert_eq!(st["value.1"].dims(), &[1, 5, 1, 16]);
    let restored = Session::load(hybrid.clone(), &path).unwrap();
    assert_eq!(restored.tokens(), s.tokens());

    let data = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&data).unwrap();
    let meta = meta.metadata().clone().unwrap();
    for old in ["mamba2-rs-session-v1", "mamba2-rs-session-v2"] {
        let mut m = meta.clone();
        m.insert("format".into(), old.into());
        m.remove("weights");
        let bytes =
            safetensors::serialize(st.iter().map(|(k, v)| (k.as_str(), v)), Some(m)).unwrap();
        let p = dir.path().join(format!("{old}.session"));
        std::fs::write(&p, bytes).unwrap();
        match Session::load(hybrid.clone(), &p) {
            Err(e @ Error::SessionVersion { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(old) && msg.contains("mamba2-rs-session-v3"),
                    "{msg}"
                );
            }
            other => panic!("expected SessionVersion, got {other:?}"),
        }
    }
}

/// On the CPU every op of a hybrid model takes its fast path, with Nemotron's Mamba head dim 80
/// included: prefill and decode step counted per op (the counters are per thread, and the model
/// runs on a worker of its pool, so the counts are read there).
#[test]
fn cpu_fast_paths_serve_hybrids_with_head_dim_80() {
    use mamba2_ops::fast_path_count as hits;
    for (name, ops) in [
        (
            "nemotron_h_hd80_b1",
            &[
                "ssd_chunk_scan",
                "causal_conv1d",
                "causal_attention",
                "relu_squared",
                "linear",
            ][..],
        ),
        (
            "bamba_b2",
            &[
                "ssd_chunk_scan",
                "causal_attention",
                "rotary_embedding",
                "swiglu",
            ][..],
        ),
    ] {
        let model = load(name);
        assert!(name != "nemotron_h_hd80_b1" || model.config().headdim == 80);
        let x = ids(1, 20, model.config().vocab_size);
        // The model runs on a worker of its pool (the process-wide default pool), and the
        // counters are per thread: count on that worker, where the model runs inline.
        let pool = mamba2::threads::shared_pool(None).unwrap();
        let mut cache = model.new_cache(1).unwrap();
        pool.install(|| {
            let before: Vec<usize> = ops.iter().map(|o| hits(o)).collect();
            model.forward(&x, Some(&mut cache)).unwrap();
            for (op, b) in ops.iter().zip(&before) {
                assert!(
                    hits(op) > *b,
                    "{name}: prefill did not take the {op} fast path"
                );
            }
        });
        let step_ops = [
            "selective_state_update",
            "causal_conv1d_update",
            "causal_attention",
            "linear",
        ];
        pool.install(|| {
            let before: Vec<usize> = step_ops.iter().map(|o| hits(o)).collect();
            model.step(&x.i((.., 0)).unwrap(), &mut cache).unwrap();
            for (op, b) in step_ops.iter().zip(&before) {
                assert!(
                    hits(op) > *b,
                    "{name}: the step did not take the {op} fast path"
                );
            }
        });
    }
}
