//! Compiles `kernels/cuda/*.cu` to PTX with nvcc when the `cuda` feature is on; does nothing
//! otherwise, so a build without CUDA (CI) never looks for a toolkit.
//!
//! Why nvcc at build time rather than NVRTC at run time: kernel compile errors surface here, on
//! the GPU-less build machine, instead of on the (scarce) GPU; the binary needs no libnvrtc; and
//! the same toolchain (`cuda-env.sh`, `CUDA_COMPUTE_CAP`) already builds candle-kernels. See
//! `kernels/cuda/README.md`.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let src_dir = manifest.join("../../kernels/cuda");
    println!("cargo:rerun-if-changed={}", src_dir.display());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());

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
        .unwrap_or_else(|e| panic!("reading {}: {e}", src_dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu" || x == "cuh"))
        .collect();
    sources.sort();
    let mut consts = String::new();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        if src.extension().unwrap() != "cu" {
            continue;
        }
        let stem = src.file_stem().unwrap().to_str().unwrap().to_string();
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
            .unwrap_or_else(|e| panic!("running {nvcc}: {e} (source ../shared/tools/cuda-env.sh)"));
        assert!(status.success(), "nvcc failed on {}", src.display());
        consts.push_str(&format!(
            "pub const {}: &str = include_str!({:?});\n",
            stem.to_uppercase(),
            ptx.display().to_string()
        ));
    }
    std::fs::write(out_dir.join("cuda_ptx.rs"), consts).unwrap();
}
