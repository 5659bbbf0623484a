//! Invariances of the model on random weights: one-shot prefill = split prefill = token-by-token
//! decode (logits and states), bounded-memory prefill = one forward, sessions save/restore and
//! run concurrently on one shared model with identical results.

mod common;
use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use mamba2::session::{CancelToken, GenerateOptions, Session};
use mamba2::{sampling::SamplingParams, Mamba2Cache, Mamba2Config, Mamba2Model};
use std::ops::ControlFlow;
use std::sync::Arc;

fn small_config(ngroups: usize, chunk: usize) -> Mamba2Config {
    let mut c = Mamba2Config::preset("130m").unwrap();
    c.d_model = 48;
    c.n_layer = 2;
    c.headdim = 16;
    c.nheads = 6;
    c.d_inner = 96;
    c.expand = 2;
    c.ngroups = ngroups;
    c.d_state = 32;
    c.chunk_size = chunk;
    c.vocab_size = 90;
    c.pad_vocab_size_multiple = 16;
    c.validate().unwrap();
    c
}

fn ids(batch: usize, seq: usize, vocab: usize) -> Tensor {
    let v: Vec<u32> = (0..batch * seq)
        .map(|i| ((i * 37 + 11) % vocab) as u32)
        .collect();
    Tensor::from_vec(v, (batch, seq), &Device::Cpu).unwrap()
}

fn assert_states_eq(a: &Mamba2Cache, b: &Mamba2Cache, tol: f32, what: &str) {
    for i in 0..a.n_layer() {
        let ec = max_abs_diff(a.conv_state(i), b.conv_state(i));
        let es = max_abs_diff(a.ssm_state(i), b.ssm_state(i));
        assert!(
            ec <= tol && es <= tol,
            "{what}: layer {i} conv {ec} ssm {es}"
        );
    }
}

#[test]
fn prefill_split_prefill_and_decode_agree() {
    for (ngroups, chunk, seq) in [(1, 8, 29), (2, 16, 5), (6, 4, 23)] {
        let model = Mamba2Model::random(&small_config(ngroups, chunk), DType::F32, &Device::Cpu, 3)
            .unwrap();
        let x = ids(2, seq, 90);
        let mut one = model.new_cache(2).unwrap();
        let full = model.forward(&x, Some(&mut one)).unwrap(); // (2, seq, vocab)

        // split prefill at uneven points
        let mut split = model.new_cache(2).unwrap();
        let cuts = [0, seq / 3, seq / 3 + 1, seq];
        let mut parts = Vec::new();
        for w in cuts.windows(2).filter(|w| w[1] > w[0]) {
            parts.push(
                model
                    .forward(&x.narrow(1, w[0], w[1] - w[0]).unwrap(), Some(&mut split))
                    .unwrap(),
            );
        }
        let split_logits = Tensor::cat(&parts, 1).unwrap();
        assert!(
            max_abs_diff(&full, &split_logits) < 1e-4,
            "g{ngroups}: split prefill logits"
        );
        assert_states_eq(&one, &split, 1e-4, "split prefill");

        // token by token
        let mut step = model.new_cache(2).unwrap();
        for t in 0..seq {
            let l = model
                .step(&x.narrow(1, t, 1).unwrap().squeeze(1).unwrap(), &mut step)
                .unwrap();
            let e = max_abs_diff(&l, &full.narrow(1, t, 1).unwrap().squeeze(1).unwrap());
            assert!(
                e < 1e-4,
                "g{ngroups} chunk {chunk}: step {t} differs by {e}"
            );
        }
        assert_states_eq(&one, &step, 1e-4, "token-by-token");
        assert_eq!(step.seqlen_offset(), seq);
    }
}

#[test]
fn bounded_prefill_equals_one_forward() {
    let mut model = Mamba2Model::random(&small_config(2, 8), DType::F32, &Device::Cpu, 5).unwrap();
    let x = ids(1, 41, 90);
    let full = model.forward(&x, None).unwrap();
    model.set_max_prefill_tokens(7);
    let mut cache = model.new_cache(1).unwrap();
    let last = model.prefill(&x, &mut cache).unwrap(); // (1, vocab)
    assert!(max_abs_diff(&last, &full.narrow(1, 40, 1).unwrap().squeeze(1).unwrap()) < 1e-4);
}

fn opts(seed: u64) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: 12,
        sampling: SamplingParams::greedy()
            .with_temperature(0.9)
            .with_seed(seed),
        eos_token_ids: vec![],
    }
}

fn run(model: &Arc<Mamba2Model>, prompt: &[u32], seed: u64) -> Vec<u32> {
    let mut s = Session::new(model.clone()).unwrap();
    s.feed(prompt).unwrap();
    s.generate(&opts(seed), &CancelToken::new(), |_| {
        ControlFlow::Continue(())
    })
    .unwrap()
    .tokens
}

#[test]
fn sessions_in_threads_equal_sequential_runs() {
    let model =
        Arc::new(Mamba2Model::random(&small_config(2, 8), DType::F32, &Device::Cpu, 9).unwrap());
    let prompts: Vec<Vec<u32>> = (0..4)
        .map(|i| (0..5 + i).map(|t| (t * 13 + i * 7) as u32 % 90).collect())
        .collect();
    let sequential: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| run(&model, p, i as u64))
        .collect();
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, p)| {
            let m = model.clone();
            std::thread::spawn(move || run(&m, &p, i as u64))
        })
        .collect();
    let threaded: Vec<Vec<u32>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(sequential, threaded);
}

#[test]
fn cancel_leaves_session_consistent_and_save_restore_continues_identically() {
    let model =
        Arc::new(Mamba2Model::random(&small_config(2, 8), DType::F32, &Device::Cpu, 11).unwrap());
    let greedy = GenerateOptions {
        max_new_tokens: 10,
        ..Default::default()
    };
    // reference: uninterrupted greedy run of 10 tokens
    let mut reference = Session::new(model.clone()).unwrap();
    reference.feed(&[1, 2, 3, 4]).unwrap();
    let full = reference
        .generate(&greedy, &CancelToken::new(), |_| ControlFlow::Continue(()))
        .unwrap()
        .tokens;

    // cancelled after 4 tokens
    let mut s = Session::new(model.clone()).unwrap();
    s.feed(&[1, 2, 3, 4]).unwrap();
    let cancel = CancelToken::new();
    let mut n = 0;
    let part = s
        .generate(&greedy, &cancel, |_| {
            n += 1;
            if n == 4 {
                cancel.cancel();
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(part.tokens, full[..4]);
    assert_eq!(
        s.tokens().len(),
        8,
        "state has seen prompt + emitted tokens"
    );

    // save, restore, continue: same tokens as the uninterrupted run
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    s.save(&path).unwrap();
    let mut restored = Session::load(model.clone(), &path).unwrap();
    let rest_opts = GenerateOptions {
        max_new_tokens: 6,
        ..Default::default()
    };
    let rest = restored
        .generate(&rest_opts, &CancelToken::new(), |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
        .tokens;
    assert_eq!(rest, full[4..]);

    // a session file from another model is refused; so is a truncated one
    let mut three_layers = small_config(2, 8);
    three_layers.n_layer = 3;
    let mut o = Session::new(Arc::new(
        Mamba2Model::random(&three_layers, DType::F32, &Device::Cpu, 1).unwrap(),
    ))
    .unwrap();
    o.feed(&[1]).unwrap();
    let other_path = dir.path().join("o.safetensors");
    o.save(&other_path).unwrap();
    assert!(matches!(
        Session::load(model.clone(), &other_path),
        Err(mamba2::Error::SessionModelMismatch { what: "model", .. })
    ));
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        Session::load(model.clone(), &path),
        Err(mamba2::Error::SessionFile { .. })
    ));
}

#[test]
fn shared_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<Mamba2Model>();
    send_sync::<mamba2::pipeline::TextGenerator>();
    send_sync::<CancelToken>();
    send::<Session>();
    send::<Mamba2Cache>();
}

#[test]
fn seeded_generation_split_across_turns_and_a_save_equals_one_run() {
    let model =
        Arc::new(Mamba2Model::random(&small_config(2, 8), DType::F32, &Device::Cpu, 13).unwrap());
    let sampled = |n| GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingParams::greedy().with_temperature(1.2).with_seed(77),
        eos_token_ids: vec![],
    };
    let go = |s: &mut Session, n| {
        s.generate(&sampled(n), &CancelToken::new(), |_| {
            ControlFlow::Continue(())
        })
        .unwrap()
        .tokens
    };
    let mut one = Session::new(model.clone()).unwrap();
    one.feed(&[5, 6, 7]).unwrap();
    let full = go(&mut one, 12);
    let mut two = Session::new(model.clone()).unwrap();
    two.feed(&[5, 6, 7]).unwrap();
    let mut got = go(&mut two, 5);
    let dir = tempfile::tempdir().unwrap();
    two.save(&dir.path().join("s")).unwrap();
    let mut restored = Session::load(model, &dir.path().join("s")).unwrap();
    got.extend(go(&mut restored, 7));
    assert_eq!(got, full);
}
