//! `kernels/metal/README.md`'s decode budget table (dispatches, bytes and FLOPs per token at
//! 130m and 1.3b) is what its formulas give for the presets: recomputed here from
//! `Mamba2Config::preset`, so a changed preset or formula shows up as a stale table.

use mamba2::config::Mamba2Config;

/// `1234567` -> `1,234,567`.
fn grouped(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The README's row for `shape`, from the formulas of its "Decode" section.
fn row(shape: &str) -> String {
    let c = Mamba2Config::preset(shape).unwrap();
    let (d, l, e, h, p, n, k) = (
        c.d_model, c.n_layer, c.d_inner, c.nheads, c.headdim, c.d_state, c.d_conv,
    );
    assert!(c.tie_embeddings && c.ngroups == 1 && e == 2 * d && p == 64);
    let v = c.padded_vocab_size();
    let w_in = d * c.d_in_proj();
    assert_eq!(c.d_in_proj(), 2 * e + 2 * c.ngroups * n + h);
    let w_out = e * d;
    let conv_dim = c.conv_dim();
    let dispatches = 4 * l + 3;
    let weights = 2 * (l * (w_in + w_out) + v * d + d);
    let small = 4 * (l * (conv_dim * (k + 1) + 3 * h + e + d) + d);
    let state = l * (8 * h * p * n + 8 * conv_dim * k);
    let flops = l * (2 * (w_in + w_out) + 5 * h * p * n + 2 * conv_dim * k) + 2 * v * d;
    format!(
        "| {shape} | {d}, {l} | {dispatches} | {} | {} | {} | {} | {} |",
        grouped(weights),
        grouped(small),
        grouped(state),
        grouped(weights + small + state),
        grouped(flops)
    )
}

#[test]
fn readme_table_matches_the_presets() {
    let readme = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../kernels/metal/README.md"),
    )
    .unwrap();
    for shape in ["130m", "1.3b"] {
        let want = row(shape);
        assert!(
            readme.lines().any(|l| l.trim() == want),
            "kernels/metal/README.md lacks the row\n{want}"
        );
    }
    assert_eq!(grouped(1_234_567), "1,234,567");
    assert_eq!(grouped(999), "999");
}
