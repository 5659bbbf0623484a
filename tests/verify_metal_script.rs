//! The parts of the Mac verification kit (`scripts/verify-metal.sh`, `scripts/verify_metal.py`)
//! that run without a Mac: the script parses, refuses cleanly off macOS before touching
//! anything, and its Python helper's readers, comparisons and table are right.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn script_parses() {
    let st = Command::new("bash")
        .args(["-n", "scripts/verify-metal.sh"])
        .current_dir(root())
        .status()
        .unwrap();
    assert!(st.success(), "bash -n scripts/verify-metal.sh failed");
    // shellcheck where installed (`apt-get install shellcheck`); bash -n above runs everywhere
    match Command::new("shellcheck")
        .arg("scripts/verify-metal.sh")
        .current_dir(root())
        .output()
    {
        Ok(o) => assert!(
            o.status.success(),
            "shellcheck:\n{}",
            String::from_utf8_lossy(&o.stdout)
        ),
        Err(_) => eprintln!("shellcheck not installed: only bash -n ran"),
    }
}

#[cfg(not(target_os = "macos"))]
#[test]
fn script_refuses_cleanly_off_macos() {
    let out_dir = std::env::temp_dir().join(format!("verify-metal-{}", std::process::id()));
    let o = Command::new("bash")
        .args(["scripts/verify-metal.sh", "tests"])
        .env("VERIFY_METAL_OUT", &out_dir)
        .current_dir(root())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "stderr: {stderr}");
    assert!(
        stderr.starts_with("verify-metal.sh: needs macOS") && stderr.contains("emulated"),
        "{stderr}"
    );
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        !out_dir.exists(),
        "the script wrote {} before refusing",
        out_dir.display()
    );
}

#[test]
fn python_helper_selftest() {
    let o = Command::new("python3")
        .args(["scripts/verify_metal.py", "selftest"])
        .current_dir(root())
        .output()
        .expect("python3 is needed by the project's scripts");
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
