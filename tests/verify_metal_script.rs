//! The parts of the Mac verification kit (`scripts/verify-metal.sh`, `scripts/verify_metal.py`)
//! that run without a Mac: the script parses, refuses cleanly off macOS before touching
//! anything, its dry run lists every step's command (the device tests it finds, the fixtures,
//! the golden tokens, six benchmarks, the table), and its Python helper's readers, comparisons
//! and table are right.

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
fn dry_run_lists_every_step() {
    let out_dir = std::env::temp_dir().join(format!("verify-metal-dry-{}", std::process::id()));
    let o = Command::new("bash")
        .args(["scripts/verify-metal.sh", "--dry-run"])
        .env("VERIFY_METAL_OUT", &out_dir)
        .current_dir(root())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let commands: Vec<&str> = text.lines().filter(|l| l.starts_with("+ ")).collect();
    // every metal_device* target of mamba2-ops, run with the ignored (device) tests
    let tests = commands
        .iter()
        .find(|c| c.starts_with("+ cargo test --release --features metal"))
        .unwrap_or_else(|| panic!("no parity tests in\n{text}"));
    let mut targets = 0;
    for e in std::fs::read_dir(root().join("crates/mamba2-ops/tests")).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if let Some(stem) = name
            .strip_prefix("metal_device")
            .and_then(|r| r.strip_suffix(".rs"))
        {
            let want = format!("-p mamba2-ops --test metal_device{stem}");
            assert!(tests.contains(&want), "{want} missing from {tests}");
            targets += 1;
        }
    }
    assert!(
        targets >= 2 && tests.ends_with("-- --ignored --test-threads=1"),
        "{tests}"
    );
    for step in ["fixtures", "golden"] {
        let want = format!("+ python3 scripts/verify_metal.py {step} target/release/mamba2");
        assert!(commands.contains(&want.as_str()), "{want} missing:\n{text}");
    }
    for shape in ["130m", "370m", "1.3b"] {
        for dtype in ["f16", "bf16"] {
            let want = format!("bench --shape {shape} --device metal --dtype {dtype} ");
            assert!(
                commands.iter().filter(|c| c.contains(&want)).count() == 1,
                "{want} missing:\n{text}"
            );
        }
    }
    assert!(
        commands.last().unwrap().contains("verify_metal.py table"),
        "{text}"
    );
    assert!(!out_dir.exists(), "a dry run wrote {}", out_dir.display());
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
