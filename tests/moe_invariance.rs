//! Invariance of the mixture-of-experts hybrids (issue 16): one-shot prefill = prefill in uneven
//! pieces = token-by-token decode = bounded-piece `prefill` = a cache saved to a file and
//! restored, for the logits and every state (SSM states and KV caches), with batch 2 whose rows
//! are routed to different experts. Runs on the HF fixture checkpoints of both MoE families
//! (tests/fixtures/moe), whose absolute accuracy tests/moe_fixtures.rs checks.

mod common;
use candle_core::{DType, Device, IndexOp, Tensor};
use common::max_abs_diff;
use mamba2::cache::KvCache;
use mamba2::session::Session;
use mamba2::{pipeline::load_model, Mamba2Cache, Mamba2Model};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

const TOL: f32 = 2e-5;

/// Both families, the Nemotron-H case with group-limited routing.
const CASES: [&str; 2] = ["granite_moe_b2", "nemotron_moe_grouped_b2"];

fn load(name: &str) -> Mamba2Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/moe")
        .join(name)
        .join("hf");
    let files = mamba2::hub::resolve_model(dir.to_str().unwrap(), &Default::default()).unwrap();
    load_model(&files, DType::F32, &Device::Cpu).unwrap()
}

/// Two rows of different token streams.
fn ids(batch: usize, seq: usize, vocab: usize) -> Tensor {
    let v: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 37 + 11 + (i / seq) * 53) % vocab) as u32)
        .collect();
    Tensor::from_vec(v, (batch, seq), &Device::Cpu).unwrap()
}

fn assert_states_equal(a: &Mamba2Cache, b: &Mamba2Cache, what: &str) {
    assert_eq!(a.seqlen_offset(), b.seqlen_offset(), "{what}: offsets");
    assert_eq!((a.n_layer(), a.n_kv()), (b.n_layer(), b.n_kv()), "{what}");
    for i in 0..a.n_layer() {
        let ec = max_abs_diff(a.conv_state(i), b.conv_state(i));
        let es = max_abs_diff(a.ssm_state(i), b.ssm_state(i));
        assert!(
            ec <= TOL && es <= TOL,
            "{what}: SSM block {i}: conv {ec}, ssm {es}"
        );
    }
    for j in 0..a.n_kv() {
        let k = max_abs_diff(
            &a.kv(j).keys().unwrap().unwrap(),
            &b.kv(j).keys().unwrap().unwrap(),
        );
        let v = max_abs_diff(
            &a.kv(j).values().unwrap().unwrap(),
            &b.kv(j).values().unwrap().unwrap(),
        );
        assert!(k <= TOL && v <= TOL, "{what}: KV block {j}: k {k}, v {v}");
    }
}

/// Writes every state of `cache` to a safetensors file and builds a cache from it again.
fn save_and_restore(cache: &Mamba2Cache, dir: &Path) -> Mamba2Cache {
    let mut t: HashMap<String, Tensor> = HashMap::new();
    for i in 0..cache.n_layer() {
        t.insert(format!("conv.{i}"), cache.conv_state(i).clone());
        t.insert(format!("ssm.{i}"), cache.ssm_state(i).clone());
    }
    for j in 0..cache.n_kv() {
        t.insert(format!("k.{j}"), cache.kv(j).keys().unwrap().unwrap());
        t.insert(format!("v.{j}"), cache.kv(j).values().unwrap().unwrap());
    }
    let path = dir.join("cache.safetensors");
    candle_core::safetensors::save(&t, &path).unwrap();
    let mut r = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut take = |k: String| r.remove(&k).unwrap();
    let conv = (0..cache.n_layer())
        .map(|i| take(format!("conv.{i}")))
        .collect();
    let ssm = (0..cache.n_layer())
        .map(|i| take(format!("ssm.{i}")))
        .collect();
    let kv = (0..cache.n_kv())
        .map(|j| KvCache::from_tensors(take(format!("k.{j}")), take(format!("v.{j}"))).unwrap())
        .collect();
    Mamba2Cache::from_states(conv, ssm, kv, cache.seqlen_offset()).unwrap()
}

/// The experts each row of a batch-2 forward sent each token to: `(layer, position, ids)`.
type Routes = BTreeSet<(usize, usize, Vec<u32>)>;

fn experts_per_row(model: &Mamba2Model, seq: usize) -> [Routes; 2] {
    let mut rows = [BTreeSet::new(), BTreeSet::new()];
    for t in model.take_routing_trace() {
        for ids in &t.ids {
            for (tok, e) in ids.to_vec2::<u32>().unwrap().into_iter().enumerate() {
                let mut e = e;
                e.sort();
                rows[tok / seq].insert((t.layer, tok % seq, e));
            }
        }
    }
    rows
}

#[test]
fn moe_prefill_split_decode_and_restore_agree() {
    let dir = tempfile::tempdir().unwrap();
    for name in CASES {
        let mut model = load(name);
        let (batch, seq) = (2, 23);
        let x = ids(batch, seq, model.config().vocab_size);

        model.record_routing(true);
        let mut one = model.new_cache(batch).unwrap();
        let full = model.forward(&x, Some(&mut one)).unwrap(); // (batch, seq, vocab)
        let [a, b] = experts_per_row(&model, seq);
        model.record_routing(false);
        // The rows send their tokens to different experts, so a batch that mixed up the rows'
        // experts would change the logits.
        let differ = a.symmetric_difference(&b).count();
        assert!(differ > seq, "{name}: rows differ in {differ} routes only");

        let mut split = model.new_cache(batch).unwrap();
        let mut parts = Vec::new();
        for (s, e) in [(0, 4), (4, 5), (5, 14), (14, seq)] {
            let piece = x.narrow(1, s, e - s).unwrap();
            parts.push(model.forward(&piece, Some(&mut split)).unwrap());
        }
        let e = max_abs_diff(&full, &Tensor::cat(&parts, 1).unwrap());
        assert!(e <= TOL, "{name}: split prefill logits differ by {e}");
        assert_states_equal(&one, &split, &format!("{name} split"));

        let mut steps = model.new_cache(batch).unwrap();
        let mut rows = Vec::new();
        for t in 0..seq {
            let l = model.step(&x.i((.., t)).unwrap(), &mut steps).unwrap();
            rows.push(l.unsqueeze(1).unwrap());
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

        // Prefill half, save the cache to a file, restore it and decode the rest: the logits
        // and final states of the uninterrupted prefill.
        let half = 11;
        let mut first = model.new_cache(batch).unwrap();
        model
            .forward(&x.narrow(1, 0, half).unwrap(), Some(&mut first))
            .unwrap();
        let mut restored = save_and_restore(&first, dir.path());
        assert_states_equal(&first, &restored, &format!("{name} restored"));
        drop(first);
        let mut rows = Vec::new();
        for t in half..seq {
            let l = model.step(&x.i((.., t)).unwrap(), &mut restored).unwrap();
            rows.push(l.unsqueeze(1).unwrap());
        }
        let tail = full.narrow(1, half, seq - half).unwrap();
        let e = max_abs_diff(&tail, &Tensor::cat(&rows, 1).unwrap());
        assert!(e <= TOL, "{name}: decode after restore differs by {e}");
        assert_states_equal(&one, &restored, &format!("{name} after restore"));
    }
}

/// A conversation fed turn by turn through session files (the format `Session::save` writes)
/// gives the logits and states of one prefill of the whole text, and the same greedy tokens.
#[test]
fn moe_session_turns_through_files_equal_one_shot() {
    let dir = tempfile::tempdir().unwrap();
    for name in CASES {
        let model = Arc::new(load(name));
        let vocab = model.config().vocab_size as u32;
        let turns: Vec<Vec<u32>> = vec![
            (0..6).map(|i| (i * 13 + 5) % vocab).collect(),
            (0..3).map(|i| (i * 29 + 3) % vocab).collect(),
            (0..8).map(|i| (i * 17 + 1) % vocab).collect(),
        ];
        let path = dir.path().join(format!("{name}.session"));
        let mut s = Session::new(model.clone()).unwrap();
        for t in &turns {
            s.feed(t).unwrap();
            s.flush().unwrap();
            s.save(&path).unwrap();
            s = Session::load(model.clone(), &path).unwrap();
        }
        let mut one = Session::new(model.clone()).unwrap();
        one.feed(&turns.concat()).unwrap();
        one.flush().unwrap();
        let (la, lb) = (s.last_logits().unwrap(), one.last_logits().unwrap());
        let e = la
            .iter()
            .zip(lb)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(e <= TOL, "{name}: turn-by-turn last logits differ by {e}");
        assert_states_equal(s.cache(), one.cache(), &format!("{name} turns"));

        let opts = mamba2::session::GenerateOptions {
            max_new_tokens: 6,
            eos_token_ids: Vec::new(),
            ..Default::default()
        };
        let cancel = mamba2::session::CancelToken::new();
        let mut out = [Vec::new(), Vec::new()];
        for (sess, o) in [&mut s, &mut one].into_iter().zip(out.iter_mut()) {
            sess.generate(&opts, &cancel, |t| {
                o.push(t);
                std::ops::ControlFlow::Continue(())
            })
            .unwrap();
        }
        assert_eq!(out[0], out[1], "{name}: continuations differ");
    }
}
