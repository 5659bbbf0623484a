//! The session API apps build on: session files tied to the weights' content and written
//! atomically, cancellation between prefill pieces, host-checked ids, the pull-style token and
//! text streams equal to the callback API, and `Mamba2Cache::from_states`' typed errors.

use candle_core::{DType, Device, Tensor};
use mamba2::pipeline::{load_model, TextGenerator, TextOptions};
use mamba2::sampling::SamplingParams;
use mamba2::session::{CancelToken, GenerateOptions, Session, StopReason};
use mamba2::{Error, Mamba2Cache, Mamba2Config, Mamba2Model};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn bundled() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/mamba2-tiny")
}

fn small(seed: u64, piece: usize) -> Arc<Mamba2Model> {
    let mut cfg = Mamba2Config::preset("130m").unwrap();
    (
        cfg.n_layer,
        cfg.d_model,
        cfg.d_inner,
        cfg.nheads,
        cfg.d_state,
    ) = (2, 64, 128, 2, 16);
    (cfg.vocab_size, cfg.pad_vocab_size_multiple, cfg.chunk_size) = (100, 1, 8);
    let mut m = Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, seed).unwrap();
    m.set_max_prefill_tokens(piece);
    Arc::new(m)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A same-shape fine-tune (the bundled checkpoint with one weight changed) is refused by the
/// session file; an identical copy of the checkpoint loads it.
#[test]
fn session_of_a_same_shape_fine_tune_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (same, tuned) = (dir.path().join("same"), dir.path().join("tuned"));
    copy_dir(&bundled(), &same);
    copy_dir(&bundled(), &tuned);
    // Change one bf16 weight: the last two bytes of the data section (the last tensor).
    let st = tuned.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let n = bytes.len();
    bytes[n - 2] ^= 0x01;
    std::fs::write(&st, &bytes).unwrap();

    let load = |d: &Path| {
        let files = mamba2::hub::resolve_model(&d.to_string_lossy(), &Default::default()).unwrap();
        Arc::new(load_model(&files, DType::F32, &Device::Cpu).unwrap())
    };
    let (base, copy, tuned) = (load(&bundled()), load(&same), load(&tuned));
    assert_eq!(base.num_parameters(), tuned.num_parameters());
    let mut s = Session::new(base.clone()).unwrap();
    s.feed(&[10, 20, 30, 40]).unwrap();
    let path = dir.path().join("chat.session");
    s.save(&path).unwrap();

    let restored = Session::load(copy, &path).unwrap();
    assert_eq!(restored.tokens(), s.tokens());
    match Session::load(tuned.clone(), &path) {
        Err(
            e @ Error::SessionModelMismatch {
                what: "weights", ..
            },
        ) => {
            assert!(e.to_string().contains("xxh3-128:"), "{e}")
        }
        other => panic!("expected SessionModelMismatch(weights), got {other:?}"),
    }
    assert_ne!(
        base.weights_fingerprint().unwrap(),
        tuned.weights_fingerprint().unwrap()
    );
    // The fingerprint is of the weights as loaded: the same file in bf16 is another model.
    let files =
        mamba2::hub::resolve_model(&bundled().to_string_lossy(), &Default::default()).unwrap();
    let bf16 = load_model(&files, DType::BF16, &Device::Cpu).unwrap();
    assert_ne!(
        base.weights_fingerprint().unwrap(),
        bf16.weights_fingerprint().unwrap()
    );
}

/// Saving goes through a temporary file in the target's folder and a rename: overwriting
/// leaves one complete file and no temporary; a folder that does not exist is a typed error
/// and creates nothing.
#[test]
fn session_files_are_written_atomically() {
    let model = small(1, 512);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.session");
    std::fs::write(&path, b"an older, unrelated file").unwrap();
    let mut s = Session::new(model.clone()).unwrap();
    s.feed(&[1, 2, 3]).unwrap();
    s.save(&path).unwrap();
    s.feed(&[4]).unwrap();
    s.save(&path).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("s.session")]);
    assert_eq!(
        Session::load(model.clone(), &path).unwrap().tokens(),
        &[1, 2, 3, 4]
    );
    let missing = dir.path().join("no/such/dir/s.session");
    assert!(matches!(s.save(&missing), Err(Error::Io { .. })));
    assert!(!dir.path().join("no").exists());
}

/// Cancelling between prefill pieces: `Cancelled`, the pieces that ran in the state, the rest
/// pending; flushing again gives the logits of an uncancelled prefill.
#[test]
fn prefill_is_cancelled_between_pieces() {
    let model = small(2, 8);
    let prompt: Vec<u32> = (0..50).map(|i| (i * 7 + 3) % 100).collect();
    let mut whole = Session::new(model.clone()).unwrap();
    whole.feed(&prompt).unwrap();
    whole.flush().unwrap();

    let mut s = Session::new(model.clone()).unwrap();
    s.feed(&prompt).unwrap();
    let cancel = CancelToken::new();
    let mut calls = Vec::new();
    let r = s.flush_with_progress(&cancel, |done, total| {
        calls.push((done, total));
        if done >= 16 {
            cancel.cancel();
        }
    });
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert_eq!(calls, vec![(8, 50), (16, 50)]);
    assert_eq!(s.tokens(), &prompt[..16]);
    assert_eq!(s.pending(), &prompt[16..]);
    assert_eq!(s.cache().seqlen_offset(), 16);
    // generate() with the cancelled token refuses to start; a fresh token continues.
    let opts = GenerateOptions::default();
    assert!(matches!(
        s.generate(&opts, &cancel, |_| ControlFlow::Continue(())),
        Err(Error::Cancelled)
    ));
    assert_eq!(s.flush().unwrap(), 34);
    assert_eq!(s.tokens(), whole.tokens());
    let (a, b) = (s.last_logits().unwrap(), whole.last_logits().unwrap());
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(diff < 1e-4, "{diff}");
}

/// A cancel from another thread during a long prefill ends it before the prompt is done.
#[test]
fn prefill_cancelled_from_another_thread() {
    let model = small(3, 1);
    let prompt: Vec<u32> = (0..20_000).map(|i| i % 100).collect();
    let mut s = Session::new(model).unwrap();
    s.feed(&prompt).unwrap();
    let cancel = CancelToken::new();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let remote = cancel.clone();
    let canceller = std::thread::spawn(move || {
        rx.recv().unwrap();
        remote.cancel();
    });
    let tx = std::sync::Mutex::new(Some(tx));
    let r = s.flush_with_progress(&cancel, move |_, _| {
        if let Some(tx) = tx.lock().unwrap().take() {
            tx.send(()).unwrap();
        }
    });
    canceller.join().unwrap();
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    assert!(s.tokens().len() < prompt.len());
    assert_eq!(s.tokens().len() + s.pending().len(), prompt.len());
}

/// Ids from the host are checked on the host: an id past the embedding is a typed error, and
/// `step_tokens` / `prefill_tokens` equal `step` / `prefill` on tensors.
#[test]
fn host_ids_are_checked_on_the_host() {
    let model = small(4, 4);
    let mut c = model.new_cache(1).unwrap();
    assert!(matches!(
        model.step_tokens(&[100], &mut c),
        Err(Error::TokenOutOfRange { id: 100, .. })
    ));
    assert!(matches!(
        model.prefill_tokens(&[], &mut c, &CancelToken::new()),
        Err(Error::EmptyPrompt)
    ));
    let ids = [5u32, 6, 7, 8, 9, 10];
    let mut c1 = model.new_cache(1).unwrap();
    let mut c2 = model.new_cache(1).unwrap();
    let a = model
        .prefill_tokens(&ids, &mut c1, &CancelToken::new())
        .unwrap();
    let t = Tensor::new(&ids[..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let b = model.prefill(&t, &mut c2).unwrap();
    let max = |a: &Tensor, b: &Tensor| {
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
    };
    assert_eq!(max(&a, &b), 0.0);
    let a = model.step_tokens(&[11], &mut c1).unwrap();
    let b = model
        .step(&Tensor::new(&[11u32], &Device::Cpu).unwrap(), &mut c2)
        .unwrap();
    assert_eq!(max(&a, &b), 0.0);
}

fn sampled(n: usize, eos: Vec<u32>) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingParams {
            temperature: 0.9,
            top_p: Some(0.95),
            seed: 11,
            ..SamplingParams::greedy()
        },
        eos_token_ids: eos,
    }
}

/// The token iterator yields exactly what the callback gets, with the same summary, for a
/// max-tokens end, an EOS end, an early stop, and across turns (the random stream continues).
#[test]
fn token_stream_equals_callback_generation() {
    let model = small(5, 512);
    let cancel = CancelToken::new();
    let run_cb = |s: &mut Session, o: &GenerateOptions, stop_after: Option<usize>| {
        let mut got = Vec::new();
        let sum = s
            .generate(o, &cancel, |t| {
                got.push(t);
                if Some(got.len()) == stop_after {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .unwrap();
        (got, sum.tokens, sum.stop_reason)
    };
    let run_it = |s: &mut Session, o: &GenerateOptions, stop_after: Option<usize>| {
        let mut it = s.stream(o, &cancel).unwrap();
        let mut got = Vec::new();
        for t in it.by_ref() {
            got.push(t.unwrap());
            if Some(got.len()) == stop_after {
                break;
            }
        }
        let sum = it.finish();
        (got, sum.tokens, sum.stop_reason)
    };
    // Learn a token the run produces, to use as EOS.
    let mut probe = Session::new(model.clone()).unwrap();
    probe.feed(&[1, 2, 3]).unwrap();
    let (first, _, _) = run_cb(&mut probe, &sampled(12, vec![]), None);
    let eos = first[5];
    for (opts, stop_after, reason) in [
        (sampled(12, vec![]), None, StopReason::MaxTokens),
        (sampled(12, vec![eos]), None, StopReason::Eos),
        (sampled(12, vec![]), Some(4), StopReason::Callback),
    ] {
        let (mut a, mut b) = (
            Session::new(model.clone()).unwrap(),
            Session::new(model.clone()).unwrap(),
        );
        for turn in 0..2 {
            a.feed(&[1, 2, 3]).unwrap();
            b.feed(&[1, 2, 3]).unwrap();
            let x = run_cb(&mut a, &opts, stop_after);
            let y = run_it(&mut b, &opts, stop_after);
            assert_eq!(x, y, "turn {turn}");
            assert_eq!(x.2, reason);
            assert_eq!(a.tokens(), b.tokens());
        }
    }
}

/// The text iterator yields the same pieces as the callback, with stop strings and the text
/// held back for them, on the bundled model and its tokenizer.
#[test]
fn text_stream_equals_callback_generation() {
    let gen = TextGenerator::load(&bundled().to_string_lossy(), &Default::default()).unwrap();
    let cancel = CancelToken::new();
    for stop in [vec![], vec![", ".to_string()], vec!["zzz".to_string()]] {
        let opts = TextOptions {
            max_new_tokens: 40,
            sampling: SamplingParams {
                temperature: 0.8,
                seed: 3,
                ..SamplingParams::greedy()
            },
            stop_strings: stop.clone(),
            ignore_eos: false,
        };
        let mut a = gen.new_session().unwrap();
        let mut cb = Vec::new();
        let sa = gen
            .generate(&mut a, "The old man said", &opts, &cancel, |t| {
                cb.push(t.to_string());
                ControlFlow::Continue(())
            })
            .unwrap();
        let mut b = gen.new_session().unwrap();
        let mut pieces = gen
            .stream(&mut b, "The old man said", &opts, &cancel)
            .unwrap();
        let it: Vec<String> = pieces.by_ref().collect::<Result<_, _>>().unwrap();
        let sb = pieces.finish();
        assert_eq!(cb, it, "stop {stop:?}");
        assert_eq!(sa.tokens, sb.tokens);
        assert_eq!(sa.stop_reason, sb.stop_reason);
        assert!(!cb.is_empty());
    }
}

/// `from_states` refuses inconsistent parts with typed errors, and a model refuses a cache whose
/// lists do not match its blocks instead of indexing past them.
#[test]
fn from_states_errors_are_typed() {
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    let conv = z(&[1, 320, 4]);
    let ssm = z(&[1, 2, 64, 16]);
    for (convs, ssms) in [
        (vec![conv.clone()], vec![]),
        (vec![z(&[320, 4])], vec![ssm.clone()]),
        (vec![conv.clone()], vec![z(&[2, 2, 64, 16])]),
        (
            vec![conv.clone()],
            vec![z(&[1, 2, 64, 16]).to_dtype(DType::BF16).unwrap()],
        ),
    ] {
        assert!(matches!(
            Mamba2Cache::from_states(convs, ssms, vec![], 0),
            Err(Error::InvalidInput(_))
        ));
    }
    let model = small(6, 512);
    let mut one_layer = Mamba2Cache::from_states(vec![conv], vec![ssm], vec![], 0).unwrap();
    assert!(matches!(
        model.step_tokens(&[1], &mut one_layer),
        Err(Error::InvalidInput(_))
    ));
    let ids = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
    assert!(matches!(
        model.forward(&ids, Some(&mut one_layer)),
        Err(Error::InvalidInput(_))
    ));
}
