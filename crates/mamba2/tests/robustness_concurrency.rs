//! Concurrency through the text-level API: N threads, each with its own session on one shared
//! `TextGenerator`, produce exactly the text and tokens of the same sessions run one after
//! another, for greedy and seeded sampling; a cancelled text generation leaves the session
//! holding exactly the tokens it emitted, and it continues like an uninterrupted one.
//! (tests/model_invariance.rs covers the same at the token level: `Session::generate`.)

use std::ops::ControlFlow;
use std::sync::Arc;

use candle_core::{DType, Device};
use mamba2::pipeline::{TextGenerator, TextOptions};
use mamba2::sampling::SamplingParams;
use mamba2::session::{CancelToken, StopReason};
use mamba2::{Error, Mamba2Config, Mamba2Model};
use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::Tokenizer;

const CORPUS: &str = "the quick brown fox jumps over the lazy dog
a mamba is a snake and mamba two is a state space model
héllo wörld 日本語 🙂 the state has a constant size";

/// A byte-level BPE trained here (every byte is a token, so any model output decodes).
fn generator() -> TextGenerator {
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let mut trainer: TrainerWrapper = BpeTrainer::builder()
        .vocab_size(300)
        .min_frequency(1)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tokenizer.train(&mut trainer, CORPUS.lines()).unwrap();
    let vocab = tokenizer.get_vocab_size(true);
    let mut c = Mamba2Config::preset("130m").unwrap();
    (
        c.d_model,
        c.n_layer,
        c.headdim,
        c.nheads,
        c.d_inner,
        c.d_state,
        c.ngroups,
        c.chunk_size,
    ) = (32, 2, 16, 4, 64, 16, 2, 8);
    c.vocab_size = vocab;
    c.pad_vocab_size_multiple = 8;
    let model = Mamba2Model::random(&c, DType::F32, &Device::Cpu, 21).unwrap();
    TextGenerator::new(Arc::new(model), Arc::new(tokenizer), vec![], None)
}

fn options(seed: Option<u64>, n: usize) -> TextOptions {
    let sampling = match seed {
        None => SamplingParams::greedy(),
        Some(s) => SamplingParams::greedy()
            .with_temperature(0.9)
            .with_top_p(0.95)
            .with_seed(s),
    };
    TextOptions {
        max_new_tokens: n,
        sampling,
        ignore_eos: true,
        ..Default::default()
    }
}

/// Two turns in one session: returns the streamed text and the session's tokens.
fn conversation(gen: &TextGenerator, prompt: &str, seed: Option<u64>) -> (String, Vec<u32>) {
    let mut session = gen.new_session().unwrap();
    let mut text = String::new();
    for turn in [prompt, " and then"] {
        gen.generate(
            &mut session,
            turn,
            &options(seed, 16),
            &CancelToken::new(),
            |t| {
                text.push_str(t);
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    }
    (text, session.tokens().to_vec())
}

#[test]
fn threaded_text_sessions_equal_sequential_ones_greedy_and_seeded() {
    let gen = generator();
    let prompts = ["the quick", "a mamba", "héllo 日本", "state space", "fox"];
    // Greedy (None) and seeded sampling with a different seed per session.
    let cases: Vec<(String, Option<u64>)> = prompts
        .iter()
        .flat_map(|p| [(p.to_string(), None), (p.to_string(), Some(p.len() as u64))])
        .collect();
    let sequential: Vec<_> = cases
        .iter()
        .map(|(p, seed)| conversation(&gen, p, *seed))
        .collect();
    let threaded: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(p, seed)| {
                let gen = gen.clone();
                scope.spawn(move || conversation(&gen, p, *seed))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(sequential, threaded);
    // The test can fail: seeded sampling differs from greedy, and seeds differ from each other.
    assert_ne!(sequential[0], sequential[1]);
    let seeds: std::collections::HashSet<_> = sequential.iter().skip(1).step_by(2).collect();
    assert!(seeds.len() > 1);
}

#[test]
fn cancelled_text_generation_leaves_a_consistent_session() {
    let gen = generator();
    let opts = options(Some(5), 20);
    let prompt = "the lazy dog";
    let prompt_len = gen.encode(prompt).unwrap().len();
    let mut reference = gen.new_session().unwrap();
    let full = gen
        .generate(&mut reference, prompt, &opts, &CancelToken::new(), |_| {
            ControlFlow::Continue(())
        })
        .unwrap();

    // Cancelled from another thread after a few pieces of text.
    let mut session = gen.new_session().unwrap();
    let cancel = CancelToken::new();
    let remote = cancel.clone();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let canceller = std::thread::spawn(move || {
        for _ in 0..3 {
            rx.recv().unwrap();
        }
        remote.cancel();
    });
    let mut pieces = 0;
    let part = gen
        .generate(&mut session, prompt, &opts, &cancel, |_| {
            pieces += 1;
            if pieces <= 3 {
                tx.send(()).unwrap();
            }
            // Wait for the other thread's cancel before the next token, so the cut is exact.
            if pieces == 3 {
                while !cancel.is_cancelled() {
                    std::thread::yield_now();
                }
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    canceller.join().unwrap();
    assert_eq!(part.stop_reason, StopReason::Cancelled);
    let n = part.tokens.len();
    assert!(n > 0 && n < full.tokens.len(), "{n}");
    assert_eq!(part.tokens, full.tokens[..n]);
    // The state holds the prompt and exactly the emitted tokens.
    assert_eq!(session.tokens().len(), prompt_len + n);
    assert_eq!(&session.tokens()[prompt_len..], &full.tokens[..n]);
    assert_eq!(session.cache().seqlen_offset(), prompt_len + n);
    // Its state is that of the prompt plus the emitted tokens: a fresh session fed the same
    // tokens in one prefill has the same logits and SSM states (prefill vs step rounding only).
    let mut replay = gen.new_session().unwrap();
    replay.feed(session.tokens()).unwrap();
    replay.flush().unwrap();
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let (l1, l2) = (
        session.last_logits().unwrap(),
        replay.last_logits().unwrap(),
    );
    assert!(max_diff(l1, l2) < 1e-3, "{}", max_diff(l1, l2));
    for i in 0..session.cache().n_layer() {
        let flat = |c: &mamba2::Mamba2Cache| {
            c.ssm_state(i)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let d = max_diff(&flat(session.cache()), &flat(replay.cache()));
        assert!(d < 1e-3, "layer {i}: {d}");
    }
    // And it stays usable: an empty follow-up prompt continues the sequence.
    let greedy = options(None, 6);
    let more = gen
        .generate(&mut session, "", &greedy, &CancelToken::new(), |_| {
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(more.tokens.len(), 6);
    assert_eq!(session.tokens().len(), prompt_len + n + 6);
    // An empty prompt on an empty session is the typed error.
    let mut empty = gen.new_session().unwrap();
    assert!(matches!(
        gen.generate(&mut empty, "", &greedy, &CancelToken::new(), |_| {
            ControlFlow::Continue(())
        }),
        Err(Error::EmptyPrompt)
    ));
}
