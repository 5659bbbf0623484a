//! candle-transformers 0.11 `models::mamba2` at a real model shape on CUDA, same protocol as
//! `mamba2 bench`: warm-up, then timed runs of (prefill N tokens, decode M tokens greedy),
//! medians. Weights are zeros from a `VarMap` (no checkpoint of this size here; the work per
//! token does not depend on the values). Usage: BIN 1.3b|2.7b bf16|f32 PREFILL DECODE RUNS CHUNK
//! [BATCH] (default 1; decode tok/s counts every sequence's tokens). PREFILL 0 decodes from
//! an empty state (its chunked prefill fails at batch > 1: a non-contiguous matmul).
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::mamba2::{Config, Model, State};
use std::time::Instant;

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let (d_model, n_layer) = match a[1].as_str() {
        "2.7b" => (2560, 64),
        _ => (2048, 48),
    };
    let dtype = if a[2] == "f32" { DType::F32 } else { DType::BF16 };
    let (prefill, decode, runs, chunk): (usize, usize, usize, usize) =
        (a[3].parse()?, a[4].parse()?, a[5].parse()?, a[6].parse()?);
    let batch: usize = a.get(7).map_or(Ok(1), |b| b.parse())?;
    let dev = Device::new_cuda(0)?;
    let cfg: Config = serde_json::from_value(serde_json::json!({
        "d_model": d_model, "n_layer": n_layer, "vocab_size": 50277, "d_state": 128,
        "expand": 2, "headdim": 64, "ngroups": 1, "pad_vocab_size_multiple": 16}))?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &dev);
    let model = Model::new(&cfg, vb.pp("backbone"))?;
    let ids: Vec<u32> = (0..batch * prefill)
        .map(|i| (i as u32 * 7919 + 13) % 50277)
        .collect();
    let ids = Tensor::from_vec(ids, (batch, prefill), &dev)?; // (batch, prefill)
    let (mut ps, mut ds) = (vec![], vec![]);
    for run in 0..runs + 1 {
        let mut state = State::new(batch, &cfg, dtype, &dev)?;
        dev.synchronize()?;
        let t0 = Instant::now();
        let mut next = if prefill == 0 {
            Tensor::zeros(batch, DType::U32, &dev)? // (batch)
        } else {
            let logits = model.forward_prefill(&ids, &mut state, chunk)?; // (batch, prefill, vocab)
            logits.narrow(1, prefill - 1, 1)?.squeeze(1)?.argmax(D::Minus1)? // (batch)
        };
        dev.synchronize()?;
        let t1 = Instant::now();
        for _ in 0..decode {
            let logits = model.forward(&next, &mut state)?; // (batch, vocab)
            next = logits.argmax(D::Minus1)?;
        }
        next.to_vec1::<u32>()?;
        dev.synchronize()?;
        let t2 = Instant::now();
        if run >= 1 {
            ps.push((t1 - t0).as_secs_f64());
            ds.push((t2 - t1).as_secs_f64());
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (p, d) = (med(&mut ps.clone()), med(&mut ds.clone()));
    println!("{}", serde_json::json!({"engine": "candle-transformers 0.11 mamba2", "shape": a[1],
        "dtype": a[2], "batch": batch, "chunk": chunk, "prefill_tokens": prefill,
        "decode_tokens": decode, "prefill_tok_s": (batch * prefill) as f64 / p.max(1e-12),
        "decode_tok_s": (batch * decode) as f64 / d,
        "prefill_s": ps, "decode_s": ds}));
    Ok(())
}
