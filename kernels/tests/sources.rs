//! The exported constants are exactly the kernel files of the package: a `.metal` file added
//! without its constant, or a constant naming a file that is not there, fails here.

use std::collections::BTreeSet;
use std::path::Path;

fn files(dir: &str, ext: &str) -> BTreeSet<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(ext))
        .collect()
}

#[test]
fn metal_sources_are_every_metal_file_verbatim() {
    let exported: BTreeSet<String> = mamba2_kernels::metal::SOURCES
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    assert_eq!(exported, files("metal", ".metal"));
    assert_eq!(
        exported.len(),
        mamba2_kernels::metal::SOURCES.len(),
        "duplicate name"
    );
    for (name, text) in mamba2_kernels::metal::SOURCES {
        let on_disk = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("metal")
                .join(name),
        )
        .unwrap();
        assert_eq!(text, on_disk, "{name}");
        assert!(text.contains("kernel void"), "{name} has no kernel");
    }
}

#[cfg(feature = "cuda")]
#[test]
fn ptx_is_every_cu_file() {
    let exported: BTreeSet<String> = mamba2_kernels::ptx::ALL
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    assert_eq!(exported, files("cuda", ".cu"));
    for (name, ptx) in mamba2_kernels::ptx::ALL {
        assert!(ptx.contains(".entry"), "{name}: no kernel entry in the PTX");
    }
}
