//! The weight bytes a mixture-of-experts decode step reads, measured on the CPU (issue 16).
//!
//! Method: every whole memory page of every dense weight tensor is made unreadable
//! (`mprotect(PROT_NONE)`) before a decode step; a SIGSEGV handler records each page the step
//! reads and makes it readable again, so each page costs one fault and is counted once. After
//! the step the recorded pages are the weight memory the step touched. Prefetch instructions
//! never fault, so only actual loads count. The peak over a few decoded tokens is compared with
//! `Mamba2Model::weight_bytes_per_token` (the active figure), and the pages touched inside
//! the stacked routed experts are compared with the byte ranges of the experts the router chose
//! for that token (read through `record_routing`): exactly those pages, nothing of the others.
//!
//! Own test binary: the handler is process-wide. Linux only (`mprotect`, `si_addr`).
#![cfg(target_os = "linux")]

use candle_core::{DType, Device, Storage, Tensor};
use mamba2::config::BlockKind;
use mamba2::{Mamba2Config, Mamba2Model};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// A page-aligned run of whole pages inside one tensor; its pages are bits `bit0..` of BITS.
struct Region {
    start: usize,
    pages: usize,
    bit0: usize,
}

static PAGE: AtomicUsize = AtomicUsize::new(4096);
static REGIONS: OnceLock<Vec<Region>> = OnceLock::new();
static BITS: OnceLock<Vec<AtomicU64>> = OnceLock::new();
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

extern "C" fn on_fault(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize;
    let page = PAGE.load(Ordering::Relaxed);
    if let (Some(regions), Some(bits)) = (REGIONS.get(), BITS.get()) {
        for r in regions {
            if addr >= r.start && addr < r.start + r.pages * page {
                let p = (addr - r.start) / page;
                let bit = r.bit0 + p;
                bits[bit / 64].fetch_or(1 << (bit % 64), Ordering::Relaxed);
                // SAFETY: the page lies inside a live tensor buffer this test protected.
                unsafe {
                    libc::mprotect(
                        (r.start + p * page) as *mut libc::c_void,
                        page,
                        libc::PROT_READ,
                    )
                };
                return;
            }
        }
    }
    // Not one of ours (a real fault, or Rust's stack-overflow guard): hand it to the handler
    // that was installed before; the faulting access repeats under it.
    if let Some(prev) = PREVIOUS.get() {
        // SAFETY: restoring the action that was in place before this test installed its own.
        unsafe { libc::sigaction(libc::SIGSEGV, prev, std::ptr::null_mut()) };
    }
}

fn install_handler() {
    // SAFETY: a plain sigaction call with a handler that only touches atomics and mprotect.
    unsafe {
        let mut prev: libc::sigaction = std::mem::zeroed();
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_fault as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut act.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGSEGV, &act, &mut prev), 0);
        let _ = PREVIOUS.set(prev);
    }
}

/// The byte range `[begin, end)` of an f32 CPU tensor's elements.
fn byte_range(t: &Tensor) -> (usize, usize) {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        panic!("not a CPU tensor")
    };
    assert!(t.is_contiguous());
    let base = cpu.as_slice::<f32>().expect("f32 weights").as_ptr() as usize;
    let begin = base + layout.start_offset() * 4;
    (begin, begin + t.elem_count() * 4)
}

fn protect(regions: &[Region], prot: libc::c_int) {
    let page = PAGE.load(Ordering::Relaxed);
    for r in regions {
        // SAFETY: whole pages inside live tensor buffers; the model is not dropped while
        // protected, and every page is made readable and writable again before it is.
        let rc = unsafe { libc::mprotect(r.start as *mut libc::c_void, r.pages * page, prot) };
        assert_eq!(rc, 0, "mprotect");
    }
}

/// A small random MoE model of each family, experts large enough to span many pages.
fn models() -> Vec<(&'static str, Mamba2Model)> {
    let granite = r#"{"model_type": "granitemoehybrid", "hidden_size": 256, "vocab_size": 512,
        "num_hidden_layers": 2, "layer_types": ["mamba", "attention"], "mamba_n_heads": 8,
        "mamba_d_head": 64, "mamba_d_state": 16, "mamba_n_groups": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
        "intermediate_size": 128, "shared_intermediate_size": 128}"#;
    let nemotron = r#"{"model_type": "nemotron_h", "hidden_size": 256, "vocab_size": 512,
        "hybrid_override_pattern": "ME*E", "mamba_num_heads": 8, "mamba_head_dim": 64,
        "n_groups": 2, "ssm_state_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 64, "n_routed_experts": 16, "num_experts_per_tok": 3,
        "moe_intermediate_size": 128, "moe_shared_expert_intermediate_size": 128,
        "n_group": 4, "topk_group": 2}"#;
    [("granite", granite), ("nemotron_h", nemotron)]
        .into_iter()
        .map(|(name, json)| {
            let cfg = Mamba2Config::from_json_str(json, name).unwrap();
            (
                name,
                Mamba2Model::random(&cfg, DType::F32, &Device::Cpu, 7).unwrap(),
            )
        })
        .collect()
}

#[test]
fn decode_touches_the_active_weight_bytes() {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    PAGE.store(page, Ordering::Relaxed);
    let models = models();
    // Every tracked region of both models, registered once before the handler is installed.
    struct Tracked {
        model: usize,
        name: String,
        begin: usize,
        end: usize,
        region: usize,
    }
    let mut tracked = Vec::new();
    let mut regions = Vec::new();
    let mut untracked = vec![0usize; models.len()]; // bytes outside whole pages
    let mut bit0 = 0;
    for (mi, (_, m)) in models.iter().enumerate() {
        for (name, t) in m.dense_weight_tensors() {
            let (begin, end) = byte_range(&t);
            let (a, b) = (begin.next_multiple_of(page), end / page * page);
            let covered = b.saturating_sub(a);
            untracked[mi] += (end - begin) - covered;
            if covered == 0 {
                continue;
            }
            let overlap = tracked
                .iter()
                .any(|o: &Tracked| o.begin < end && begin < o.end);
            assert!(!overlap, "{name} shares memory with another weight");
            regions.push(Region {
                start: a,
                pages: covered / page,
                bit0,
            });
            bit0 += covered / page;
            tracked.push(Tracked {
                model: mi,
                name,
                begin,
                end,
                region: regions.len() - 1,
            });
        }
    }
    let n_bits = bit0;
    assert!(REGIONS.set(regions).is_ok());
    assert!(BITS
        .set(
            (0..n_bits.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect()
        )
        .is_ok());
    let (regions, bits) = (REGIONS.get().unwrap(), BITS.get().unwrap());
    install_handler();
    let touched = |r: &Region| -> BTreeSet<usize> {
        (0..r.pages)
            .filter(|p| {
                let bit = r.bit0 + p;
                bits[bit / 64].load(Ordering::Relaxed) & (1 << (bit % 64)) != 0
            })
            .collect()
    };

    for (mi, (family, model)) in models.iter().enumerate() {
        let cfg = model.config();
        let moe = cfg.moe.unwrap();
        let layer_of_block = |b: usize| cfg.block_spec(b).layer;
        let formula = model.weight_bytes_per_token();
        let mine: Vec<&Tracked> = tracked.iter().filter(|t| t.model == mi).collect();
        // Random models tie the LM head to the embedding table: decode then reads it whole.
        let tied = !mine.iter().any(|t| t.name == "lm_head");
        let embedding = 512 * 256 * 4;
        // What a step would read if it read every expert.
        let all_experts = model.weight_bytes() - if tied { 0 } else { embedding };
        let mine_regions: Vec<Region> = mine
            .iter()
            .map(|t| {
                let r = &regions[t.region];
                Region {
                    start: r.start,
                    pages: r.pages,
                    bit0: r.bit0,
                }
            })
            .collect();
        let mut cache = model.new_cache(1).unwrap();
        model.record_routing(true);
        let mut peak = 0;
        for (step, token) in [3u32, 141, 77, 402, 5].into_iter().enumerate() {
            bits.iter().for_each(|w| w.store(0, Ordering::Relaxed));
            let ids = Tensor::new(&[token], &Device::Cpu).unwrap();
            protect(&mine_regions, libc::PROT_NONE);
            let logits = model.step(&ids, &mut cache);
            protect(&mine_regions, libc::PROT_READ | libc::PROT_WRITE);
            logits.unwrap();
            // The experts chosen per MoE layer for this token.
            let chosen: Vec<(usize, Vec<u32>)> = model
                .take_routing_trace()
                .into_iter()
                .map(|t| {
                    assert_eq!(t.ids.len(), 1);
                    (t.layer, t.ids[0].to_vec2::<u32>().unwrap().remove(0))
                })
                .collect();
            let mut bytes = 0;
            for t in &mine {
                let r = &regions[t.region];
                let got = touched(r);
                bytes += got.len() * page;
                let all: BTreeSet<usize> = (0..r.pages).collect();
                // `blocks.{b}.{role}`: `role` here is `{b}.{role}`.
                let role = t.name.split_once('.').map_or("", |(_, rest)| rest);
                if t.name == "embeddings" && !tied {
                    // One row of 256 f32: at most the two pages it may straddle.
                    assert!(got.len() <= 2, "{family}: {} embedding pages", got.len());
                } else if let Some(b) = role
                    .strip_suffix(".experts.up")
                    .or_else(|| role.strip_suffix(".experts.down"))
                {
                    let layer = layer_of_block(b.parse().unwrap());
                    let ids = &chosen.iter().find(|(l, _)| *l == layer).unwrap().1;
                    let per = (t.end - t.begin) / moe.num_experts;
                    // Pages of the region that hold any byte of a chosen expert's rows.
                    let want: BTreeSet<usize> = ids
                        .iter()
                        .flat_map(|&e| {
                            let (lo, hi) =
                                (t.begin + e as usize * per, t.begin + (e as usize + 1) * per);
                            (0..r.pages).filter(move |p| {
                                let (ps, pe) = (r.start + p * page, r.start + (p + 1) * page);
                                ps < hi && lo < pe
                            })
                        })
                        .collect();
                    let extra: Vec<_> = got.difference(&want).collect();
                    let missing: Vec<_> = want.difference(&got).collect();
                    assert!(
                        extra.is_empty() && missing.is_empty(),
                        "{family} step {step}: {} read {} pages of {} for experts {ids:?}: \
                         pages read outside them {extra:?}, theirs not read {missing:?}",
                        t.name,
                        got.len(),
                        r.pages
                    );
                } else {
                    // Every other matrix is read whole.
                    assert!(
                        got == all,
                        "{family} step {step}: {} read {} of its {} pages",
                        t.name,
                        got.len(),
                        r.pages
                    );
                }
            }
            peak = peak.max(bytes);
            println!(
                "{family} step {step}: touched {bytes} B of tracked weights; formula {formula} B, \
                 untracked {} B, all experts {all_experts} B",
                untracked[mi]
            );
        }
        model.record_routing(false);
        // The peak of the touched bytes is the active figure, up to the bytes outside whole
        // pages (small tensors, partial pages at tensor ends), the embedding row's pages and
        // the pages a chosen expert shares with an unchosen neighbour (two per expert matrix).
        let moe_blocks = cfg
            .blocks()
            .iter()
            .filter(|b| b.kind == BlockKind::Moe)
            .count();
        let slack = untracked[mi] + 2 * page + moe_blocks * 2 * moe.top_k * 2 * page;
        assert!(
            peak.abs_diff(formula) <= slack,
            "{family}: peak {peak} B touched vs {formula} B per token (slack {slack})"
        );
        // ... and far from the figure with every expert read.
        assert!(
            all_experts - formula > 4 * slack,
            "{family}: the test does not discriminate"
        );
    }
}
