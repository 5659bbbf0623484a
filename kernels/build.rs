//! Compiles `cuda/*.cu` to PTX with nvcc when the `cuda` feature is on, and writes
//! `$OUT_DIR/cuda_ptx.rs` with one `pub const <FILE>: &str` per `.cu` file (plus `ALL`, the
//! list by file name). Does nothing otherwise, so a build without CUDA never looks for a toolkit.
//!
//! Why nvcc at build time rather than NVRTC at run time: kernel compile errors surface on the
//! build machine (which may have no GPU) instead of on the GPU; the binary needs no libnvrtc;
//! and the same toolchain (`NVCC` / `CUDA_HOME`, `CUDA_COMPUTE_CAP`) already builds Candle's
//! own CUDA kernels. See `cuda/README.md`.

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let manifest = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let src_dir = manifest.join("cuda");
    println!("cargo:rerun-if-changed={}", src_dir.display());
    let out_dir = PathBuf::from(env("OUT_DIR"));

    let nvcc = std::env::var("NVCC")
        .ok()
        .unwrap_or_else(|| match std::env::var("CUDA_HOME") {
            Ok(home) => format!("{home}/bin/nvcc"),
            Err(_) => "nvcc".into(),
        });
    // PTX for the virtual architecture of the target GPU; the driver JIT-compiles it at module
    // load, and newer GPUs accept it too. The tensor-core code needs sm_80 (bf16 / tf32 wmma).
    let cap: u32 = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .and_then(|s| s.trim().trim_end_matches('a').parse().ok())
        .unwrap_or(80);
    let cap = cap.max(80);

    let mut sources: Vec<PathBuf> = std::fs::read_dir(&src_dir)
        .unwrap_or_else(|e| fail(&format!("reading {}: {e}", src_dir.display())))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
        .collect();
    sources.sort();
    let mut consts = String::new();
    let mut all = String::from("/// Every PTX module by the name of its `.cu` file.\n");
    all.push_str("pub const ALL: &[(&str, &str)] = &[\n");
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        if src.extension().is_some_and(|x| x != "cu") {
            continue;
        }
        let stem = stem(src);
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let status = std::process::Command::new(&nvcc)
            .arg("-ptx")
            .arg(format!("-arch=compute_{cap}"))
            .args(["-O3", "-std=c++17", "-lineinfo"])
            .arg("-I")
            .arg(&src_dir)
            .arg("-o")
            .arg(&ptx)
            .arg(src)
            .status()
            .unwrap_or_else(|e| {
                fail(&format!(
                    "running {nvcc}: {e} (set NVCC or CUDA_HOME to a CUDA toolkit)"
                ))
            });
        if !status.success() {
            fail(&format!("nvcc failed on {}", src.display()));
        }
        let name = stem.to_uppercase();
        consts.push_str(&format!(
            "/// PTX of `cuda/{stem}.cu`.\npub const {name}: &str = include_str!({:?});\n",
            ptx.display().to_string()
        ));
        all.push_str(&format!("    (\"{stem}.cu\", {name}),\n"));
    }
    all.push_str("];\n");
    consts.push_str(&all);
    if let Err(e) = std::fs::write(out_dir.join("cuda_ptx.rs"), consts) {
        fail(&format!("writing cuda_ptx.rs: {e}"));
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| fail(&format!("{name} is not set (run by cargo)")))
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A build script reports an error by failing; the message names what to fix.
fn fail(msg: &str) -> ! {
    eprintln!("mamba2-kernels build: {msg}");
    std::process::exit(1)
}
