//! The strict pass rejects each construct Metal forbids, naming it and the
//! `.metal` line, and accepts every real kernel of `kernels/metal/`.

use msl_harness::{Construct, Error, Library, Mode, Violation};

fn path(name: &str) -> String {
    format!("{}/tests/kernels/strict/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// 1-based line of the first line of `file` containing `needle`.
fn line_of(file: &str, needle: &str) -> usize {
    std::fs::read_to_string(path(file))
        .unwrap()
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{file}: no line with {needle}"))
        + 1
}

fn rejected(file: &str) -> Violation {
    match Library::check(&[path(file)]) {
        Err(Error::Forbidden(v)) => *v,
        Err(e) => panic!("{file}: expected a forbidden construct, got {e}"),
        Ok(()) => panic!("{file}: the strict pass accepted it"),
    }
}

#[test]
fn each_forbidden_construct_is_rejected_at_its_line() {
    use Construct::*;
    // (file, construct, the line it must name)
    for (file, construct, needle) in [
        ("exception_throw.metal", Exception, "BUG"),
        ("exception_try.metal", Exception, "BUG"),
        ("recursion_direct.metal", Recursion, "BUG"),
        ("function_pointer.metal", FunctionPointer, "BUG"),
        ("virtual_function.metal", VirtualFunction, "BUG"),
        ("double_keyword.metal", Double, "BUG"),
        ("double_literal.metal", Double, "BUG"),
        ("threadgroup_static.metal", ThreadgroupMemory, "BUG"),
        ("threads_attribute.metal", ThreadsPerThreadgroup, "BUG"),
        ("device_to_thread.metal", AddressSpace, "BUG"),
        ("tg_to_device.metal", AddressSpace, "BUG"),
        ("buffer_without_space.metal", AddressSpace, "BUG"),
        ("program_scope_variable.metal", AddressSpace, "BUG"),
    ] {
        let v = rejected(file);
        assert_eq!(v.construct, construct, "{file}: {v}");
        assert!(v.file.ends_with(&format!("strict/{file}")), "{file}: {v}");
        assert_eq!(v.line, Some(line_of(file, needle)), "{file}: {v}");
        // the message names both
        let text = Error::Forbidden(Box::new(v.clone())).to_string();
        assert!(text.contains(&construct.to_string()), "{text}");
        assert!(
            text.contains(&format!("{file}:{}", line_of(file, needle))),
            "{text}"
        );
    }
}

#[test]
fn construct_details_name_the_culprit() {
    let v = rejected("recursion.metal");
    assert_eq!(v.construct, Construct::Recursion, "{v}");
    // mutual recursion: either function of the cycle, at its definition
    let f = v.function.clone().unwrap_or_default();
    assert!(f == "is_even" || f == "is_odd", "{v}");
    assert_eq!(
        v.line,
        Some(line_of("recursion.metal", &format!("bool {f}(uint n) {{"))),
        "{v}"
    );
    assert!(
        v.detail.contains("is_even -> is_odd") || v.detail.contains("is_odd -> is_even"),
        "{v}"
    );
    let v = rejected("recursion_direct.metal");
    assert!(
        v.function.as_deref().unwrap_or("").starts_with("power<"),
        "{v}"
    );
    let v = rejected("function_pointer.metal");
    assert_eq!(v.function.as_deref(), Some("function_pointer"), "{v}");
    let v = rejected("double_literal.metal");
    assert!(
        v.detail.contains("fmul") || v.detail.contains("fpext"),
        "{v}"
    );
    let v = rejected("threadgroup_static.metal");
    assert_eq!(v.function.as_deref(), Some("threadgroup_static"), "{v}");
}

#[test]
fn allowed_neighbours_pass() {
    // constant program-scope data, compile-time recursion, a uint2 by value (an ABI `double`),
    // a helper called twice, exactly 32 KiB of threadgroup memory, `0.5f` and `0.5h`
    if let Err(e) = Library::check(&[path("allowed.metal")]) {
        panic!("allowed.metal: {e}");
    }
}

#[test]
fn every_real_kernel_passes() {
    let dir = msl_harness::workspace_root().join("kernels/metal");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "metal"))
        .collect();
    files.sort();
    assert!(files.len() >= 8, "{files:?}");
    for f in &files {
        if let Err(e) = Library::check(&[f]) {
            panic!("{}: {e}", f.display());
        }
    }
}

#[test]
fn dispatches_beyond_apple_limits_are_rejected() {
    let lib = Library::compile(&[format!(
        "{}/tests/kernels/buggy.metal",
        env!("CARGO_MANIFEST_DIR")
    )])
    .unwrap();
    let mut out = vec![0.0f32; 2048];
    let r = lib
        .kernel("dynamic_tg")
        .unwrap()
        .buffer(0, &mut out)
        .threadgroup_memory(0, 64)
        .grid([1, 1, 1])
        .threadgroup([64, 32, 1])
        .mode(Mode::InOrder)
        .dispatch();
    match r {
        Err(Error::Forbidden(v)) => {
            assert_eq!(v.construct, Construct::ThreadsPerThreadgroup, "{v}");
            assert_eq!(v.function.as_deref(), Some("dynamic_tg"), "{v}");
            assert!(v.detail.contains("2048"), "{v}");
            assert!(v.file.ends_with("buggy.metal") && v.line.is_some(), "{v}");
        }
        other => panic!("expected ThreadsPerThreadgroup, got {other:?}"),
    }
    let r = lib
        .kernel("dynamic_tg")
        .unwrap()
        .buffer(0, &mut out)
        .threadgroup_memory(0, 40 * 1024)
        .grid([1, 1, 1])
        .threadgroup([32, 1, 1])
        .dispatch();
    match r {
        Err(Error::Forbidden(v)) => {
            assert_eq!(v.construct, Construct::ThreadgroupMemory, "{v}");
            assert!(v.detail.contains("40960"), "{v}");
        }
        other => panic!("expected ThreadgroupMemory, got {other:?}"),
    }
    // the limit itself cannot be raised past the hardware's
    let r = lib
        .kernel("dynamic_tg")
        .unwrap()
        .buffer(0, &mut out)
        .threadgroup_memory(0, 128)
        .threadgroup_memory_budget(64 * 1024)
        .grid([1, 1, 1])
        .threadgroup([32, 1, 1])
        .dispatch();
    assert!(matches!(r, Err(Error::InvalidDispatch(_))), "{r:?}");
    // exactly at the limits is fine
    lib.kernel("dynamic_tg")
        .unwrap()
        .buffer(0, &mut out[..1024])
        .threadgroup_memory(0, 32 * 1024)
        .grid([1, 1, 1])
        .threadgroup([1024, 1, 1])
        .dispatch()
        .unwrap();
}
