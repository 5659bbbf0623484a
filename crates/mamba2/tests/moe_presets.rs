//! The mixture-of-experts presets (`Mamba2Config::preset`, `mamba2 bench --shape`) build valid
//! configs whose parameter counts, taken from the tensor shapes they imply, match the figures
//! published with the checkpoints.

use mamba2::config::{BlockKind, Mamba2Config, MoeRouter};

/// `(total, active)` parameters from the config's tensor list: the routed experts (every
/// expert's `up` and `down` weights) count `top_k / num_experts` towards the active figure.
/// Also returns the input embedding's size (published active figures are given with and
/// without it).
fn counts(c: &Mamba2Config) -> (f64, f64, f64) {
    let moe = c.moe.expect("a MoE preset");
    let share = moe.top_k as f64 / moe.num_experts as f64;
    let (mut total, mut active, mut embedding) = (0f64, 0f64, 0f64);
    for (name, shape) in c.tensor_shapes(c.padded_vocab_size()) {
        let n = shape.iter().product::<usize>() as f64;
        let routed = name.contains("block_sparse_moe.input_linear")
            || name.contains("block_sparse_moe.output_linear")
            || (name.contains(".mixer.experts.") && !name.contains("shared"));
        total += n;
        active += if routed { n * share } else { n };
        if name.ends_with("embed_tokens.weight") || name.ends_with("embeddings.weight") {
            embedding += n;
        }
    }
    (total, active, embedding)
}

fn kinds(c: &Mamba2Config, k: BlockKind) -> usize {
    c.blocks().iter().filter(|b| b.kind == k).count()
}

/// `x` (parameters) rounds to `published` billions at `step` billions.
fn rounds_to(x: f64, published: f64, step: f64) -> bool {
    ((x / 1e9 / step).round() * step - published).abs() < step / 2.0
}

#[test]
fn granite_moe_presets_match_the_published_sizes() {
    // (name, experts, top-k, total B, active B, bf16 safetensors GiB listed for the repo)
    for (name, e, k, total_b, active_b, gib) in [
        ("granite-4.0-h-tiny", 64, 6, 7.0, 1.0, 12.93),
        ("granite-4.0-h-small", 72, 10, 32.0, 9.0, 59.99),
    ] {
        let c = Mamba2Config::preset(name).unwrap();
        let moe = c.moe.unwrap();
        assert_eq!((moe.num_experts, moe.top_k), (e, k), "{name}");
        assert_eq!(moe.router, MoeRouter::Softmax);
        // 40 layers, each its mixer then the MoE block (beside the shared MLP).
        assert_eq!(kinds(&c, BlockKind::Moe), 40, "{name}");
        assert_eq!(kinds(&c, BlockKind::Attention), 4, "{name}");
        assert_eq!(kinds(&c, BlockKind::Mamba), 36, "{name}");
        let (total, active, _) = counts(&c);
        println!("{name}: total {total:.4e}, active {active:.4e}");
        assert!(rounds_to(total, total_b, 1.0), "{name}: total {total:e}");
        assert!(
            rounds_to(active, active_b, 1.0),
            "{name}: active {active:e}"
        );
        // Tied embeddings: the bf16 checkpoint is 2 bytes per parameter, plus the files' JSON
        // headers (~0.0001 GiB), listed to 0.01 GiB.
        let got = 2.0 * total / (1u64 << 30) as f64;
        assert!((got - gib).abs() < 0.01, "{name}: {got:.4} GiB vs {gib}");
    }
}

#[test]
fn nemotron_3_nano_preset_matches_the_published_sizes() {
    let c = Mamba2Config::preset("nemotron-3-nano-30b-a3b").unwrap();
    let moe = c.moe.unwrap();
    assert_eq!((moe.num_experts, moe.top_k), (128, 6));
    assert_eq!(
        (moe.intermediate_size, moe.shared_intermediate_size),
        (1856, 3712)
    );
    assert_eq!(
        moe.router,
        MoeRouter::SigmoidGrouped {
            n_group: 1,
            topk_group: 1,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5
        }
    );
    // 23 Mamba-2, 23 MoE and 6 attention layers.
    assert_eq!(kinds(&c, BlockKind::Mamba), 23);
    assert_eq!(kinds(&c, BlockKind::Moe), 23);
    assert_eq!(kinds(&c, BlockKind::Attention), 6);
    assert_eq!((c.d_inner, c.ngroups, c.d_state), (4096, 8, 128));
    assert!(!c.tie_embeddings);
    let (total, active, embedding) = counts(&c);
    println!("nemotron-3-nano: total {total:.4e}, active {active:.4e}");
    // NVIDIA: 31.6B total, 3.2B active, 3.6B with the embeddings; the name says 30B / A3B.
    assert!(rounds_to(total, 31.6, 0.1), "total {total:e}");
    assert!(rounds_to(active, 3.6, 0.1), "active {active:e}");
    assert!(rounds_to(active - embedding, 3.2, 0.1), "active {active:e}");
    assert!(rounds_to(total, 30.0, 10.0) && rounds_to(active - embedding, 3.0, 1.0));
}

#[test]
fn preset_names_are_listed_in_the_unknown_shape_error() {
    let err = Mamba2Config::preset("granite-4.0-h-huge")
        .unwrap_err()
        .to_string();
    for name in [
        "granite-4.0-h-tiny",
        "granite-4.0-h-small",
        "nemotron-3-nano-30b-a3b",
    ] {
        assert!(err.contains(name), "{err}");
        // Any case, as the other presets.
        assert!(Mamba2Config::preset(&name.to_ascii_uppercase()).is_ok());
    }
}
