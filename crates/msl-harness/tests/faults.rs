//! Deliberately buggy kernels are each caught, with the `.metal` line.

use msl_harness::{Error, FaultKind, Library, Mode};
use std::sync::OnceLock;

fn path(name: &str) -> String {
    format!("{}/tests/kernels/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn lib() -> &'static Library {
    static LIB: OnceLock<Library> = OnceLock::new();
    LIB.get_or_init(|| Library::compile(&[path("buggy.metal")]).unwrap())
}

/// `buggy.metal:N` where line N contains `needle`.
fn line_of(needle: &str) -> String {
    let text = std::fs::read_to_string(path("buggy.metal")).unwrap();
    let n = text
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle}"))
        + 1;
    format!("buggy.metal:{n}")
}

fn expect_fault(r: Result<(), Error>, kind: FaultKind) -> msl_harness::Fault {
    match r {
        Err(Error::Fault { fault, .. }) if fault.kind == kind => fault,
        other => panic!("expected a {kind:?} fault, got {other:?}"),
    }
}

fn run1(name: &str, out: &mut [f32], groups: u32, tg: u32, mode: Mode) -> Result<(), Error> {
    lib()
        .kernel(name)?
        .buffer(0, out)
        .grid([groups, 1, 1])
        .threadgroup([tg, 1, 1])
        .mode(mode)
        .dispatch()
}

#[test]
fn missing_barrier_is_a_race() {
    let mut out = vec![f32::NAN; 64];
    for mode in [Mode::Checked, Mode::CheckedShuffled { seed: 11 }] {
        let f = expect_fault(
            run1("missing_barrier", &mut out, 1, 64, mode),
            FaultKind::Race,
        );
        assert!(f.message.contains("threadgroup array"), "{f}");
        // the unordered pair: the write after the first barrier and the read
        let mut lines = [
            f.location.clone().unwrap_or_default(),
            f.other_location.clone().unwrap_or_default(),
        ];
        lines.sort();
        let want_w = line_of("tile[tid] = float(tid);");
        let want_r = line_of("BUG: no threadgroup_barrier");
        assert!(
            lines[0].ends_with(&want_w) && lines[1].ends_with(&want_r),
            "{mode:?}: {f}"
        );
    }
    // the fixed kernel passes the checker and gives the right answer
    run1("with_barrier", &mut out, 1, 64, Mode::Checked).unwrap();
    assert!(
        out.iter()
            .enumerate()
            .all(|(i, &v)| v == ((i + 1) % 64) as f32),
        "{out:?}"
    );
}

#[test]
fn inter_group_race() {
    let mut out = vec![0.0f32; 1];
    let f = expect_fault(
        run1("inter_group_race", &mut out, 4, 32, Mode::Checked),
        FaultKind::Race,
    );
    assert!(f.message.contains("different threadgroups"), "{f}");
    assert!(
        f.location
            .as_deref()
            .unwrap_or("")
            .ends_with(&line_of("BUG: read-modify-write")),
        "{f}"
    );
}

#[test]
fn wrong_barrier_flags() {
    let mut out = vec![0.0f32; 64];
    let f = expect_fault(
        run1("wrong_barrier_flags", &mut out, 1, 64, Mode::Checked),
        FaultKind::Race,
    );
    assert!(f.message.contains("mem_device"), "{f}");
    assert!(
        f.location
            .as_deref()
            .unwrap_or("")
            .ends_with(&line_of("float v = out[(tid + 1) % n];")),
        "{f}"
    );
    let f = expect_fault(
        run1("barrier_without_mem_flags", &mut out, 1, 64, Mode::Checked),
        FaultKind::Race,
    );
    assert!(f.message.contains("mem_threadgroup"), "{f}");
}

#[test]
fn off_by_one_write() {
    let n = 64u32;
    for mode in [Mode::InOrder, Mode::Checked] {
        let mut out = vec![0.0f32; n as usize];
        let r = lib()
            .kernel("off_by_one")
            .unwrap()
            .buffer(0, &mut out)
            .bytes(1, &n)
            .grid([2, 1, 1])
            .threadgroup([64, 1, 1])
            .mode(mode)
            .dispatch();
        let f = expect_fault(r, FaultKind::OutOfBounds);
        assert!(
            f.message.contains("buffer(0) byte offset 256"),
            "{mode:?}: {f}"
        );
        assert!(
            f.location
                .as_deref()
                .unwrap_or("")
                .ends_with(&line_of("out[gid] = 1.0f;")),
            "{mode:?}: {f}"
        );
    }
    let mut out = vec![0.0f32; 32];
    let f = expect_fault(
        run1("threadgroup_off_by_one", &mut out, 1, 32, Mode::Checked),
        FaultKind::OutOfBounds,
    );
    assert!(
        f.message
            .contains("threadgroup array `tile` byte offset 128"),
        "{f}"
    );
}

#[test]
fn over_budget_threadgroup_memory() {
    let mut out = vec![0.0f32; 32];
    for mode in [Mode::InOrder, Mode::Checked] {
        let f = expect_fault(
            lib()
                .kernel("over_budget")
                .unwrap()
                .buffer(0, &mut out)
                .threadgroup_memory(0, 12 * 1024)
                .grid([1, 1, 1])
                .threadgroup([32, 1, 1])
                .mode(mode)
                .dispatch(),
            FaultKind::ThreadgroupMemory,
        );
        // 12 KiB dynamic + 24 KiB static
        assert!(
            f.message.contains("12288") && f.message.contains("24576"),
            "{f}"
        );
    }
    // dynamic threadgroup memory counts too
    let run = |len: usize, out: &mut [f32]| {
        lib()
            .kernel("dynamic_tg")?
            .buffer(0, out)
            .threadgroup_memory(0, len)
            .grid([1, 1, 1])
            .threadgroup([32, 1, 1])
            .dispatch()
    };
    // a lower budget is honoured (the hardware limit is tests/strict.rs's)
    let f = expect_fault(
        lib()
            .kernel("dynamic_tg")
            .unwrap()
            .buffer(0, &mut out)
            .threadgroup_memory(0, 256)
            .threadgroup_memory_budget(128)
            .grid([1, 1, 1])
            .threadgroup([32, 1, 1])
            .dispatch(),
        FaultKind::ThreadgroupMemory,
    );
    assert!(f.message.contains("256"), "{f}");
    assert!(matches!(run(100, &mut out), Err(Error::InvalidDispatch(_))));
    run(128, &mut out).unwrap();
    assert!(
        out.iter()
            .enumerate()
            .all(|(i, &v)| v == (31 - i) as f32 * 2.0),
        "{out:?}"
    );
    // a binding that was never set
    let r = lib()
        .kernel("dynamic_tg")
        .unwrap()
        .buffer(0, &mut out)
        .grid([1, 1, 1])
        .threadgroup([32, 1, 1])
        .dispatch();
    expect_fault(r, FaultKind::Binding);
}

#[test]
fn divergent_barrier() {
    let mut out = vec![0.0f32; 32];
    let f = expect_fault(
        run1("divergent_barrier", &mut out, 1, 32, Mode::InOrder),
        FaultKind::Barrier,
    );
    assert!(f.message.contains("divergent"), "{f}");
    assert!(
        f.location
            .as_deref()
            .unwrap_or("")
            .ends_with(&line_of("BUG: divergent")),
        "{f}"
    );
    assert!(f.other_location.is_some(), "{f}");
    let f = expect_fault(
        run1(
            "early_return_barrier",
            &mut out,
            1,
            32,
            Mode::Shuffled { seed: 1 },
        ),
        FaultKind::Barrier,
    );
    assert!(f.message.contains("already returned"), "{f}");
}

#[test]
fn uninitialised_threadgroup_read() {
    let mut out = vec![0.0f32; 64];
    let f = expect_fault(
        run1("uninit_read", &mut out, 1, 64, Mode::Checked),
        FaultKind::UninitializedRead,
    );
    assert!(
        f.location
            .as_deref()
            .unwrap_or("")
            .ends_with(&line_of("BUG: tile[32..64)")),
        "{f}"
    );
    // fast mode: the poison (NaN) is what the kernel reads
    run1("uninit_read", &mut out, 1, 64, Mode::InOrder).unwrap();
    assert!(
        out[..32].iter().all(|&v| v == 1.0) && out[32..].iter().all(|v| v.is_nan()),
        "{out:?}"
    );
}

#[test]
fn write_to_read_only_buffer() {
    let input = vec![1.0f32; 32];
    for mode in [Mode::InOrder, Mode::Checked] {
        let r = lib()
            .kernel("writes_input")
            .unwrap()
            .input(0, &input)
            .grid([1, 1, 1])
            .threadgroup([32, 1, 1])
            .mode(mode)
            .dispatch();
        expect_fault(r, FaultKind::ReadOnlyWrite);
    }
}

#[test]
fn binding_validation() {
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Params {
        n: u32,
        scale: f32,
        stride: u32,
        pad: u32,
    }
    unsafe impl msl_harness::Pod for Params {}
    let p = Params {
        n: 8,
        scale: 2.5,
        stride: 2,
        pad: 0,
    };
    let mut out = vec![0.0f32; 16];
    let k = || {
        let mut d = lib().kernel("needs_params").unwrap();
        d.grid([1, 1, 1]).threadgroup([8, 1, 1]);
        d
    };
    k().buffer(0, &mut out).bytes(1, &p).dispatch().unwrap();
    assert_eq!(
        out,
        (0..16)
            .map(|i| if i % 2 == 0 { 2.5 } else { 0.0 })
            .collect::<Vec<_>>()
    );
    // struct bound with fewer bytes than the kernel's Params
    let short = [8u32, 0];
    let f = expect_fault(
        k().buffer(0, &mut out).bytes(1, &short).dispatch(),
        FaultKind::Binding,
    );
    assert!(f.message.contains("needs 16"), "{f}");
    // unbound buffer
    let f = expect_fault(k().buffer(0, &mut out).dispatch(), FaultKind::Binding);
    assert!(
        f.message.contains("buffer(1)") && f.message.contains("not bound"),
        "{f}"
    );
    // misaligned float buffer, and a length that is not whole floats
    // heap storage: 16-byte aligned, so `raw[1..]` is certainly misaligned for f32
    #[allow(clippy::useless_vec)]
    let mut raw = vec![0u8; 68];
    let f = expect_fault(
        k().buffer(0, &mut raw[1..65]).bytes(1, &p).dispatch(),
        FaultKind::Binding,
    );
    assert!(f.message.contains("aligned"), "{f}");
    let f = expect_fault(
        k().buffer(0, &mut raw[..66]).bytes(1, &p).dispatch(),
        FaultKind::Binding,
    );
    assert!(f.message.contains("whole number"), "{f}");
    assert!(matches!(
        k().buffer(40, &mut out).dispatch(),
        Err(Error::InvalidDispatch(_))
    ));
    assert!(matches!(
        lib().kernel("no_such_kernel"),
        Err(Error::KernelNotFound { .. })
    ));
}

#[test]
fn simd_semantics() {
    let a = vec![1.0f32; 64];
    let mut out = vec![0.0f32; 64];
    let r = lib()
        .kernel("divergent_matrix")
        .unwrap()
        .input(0, &a)
        .buffer(1, &mut out)
        .grid([1, 1, 1])
        .threadgroup([32, 1, 1])
        .dispatch();
    expect_fault(r, FaultKind::SimdDivergence);
    // shuffles from lanes outside the active set read poison
    let mut out = vec![0.0f32; 32];
    run1(
        "shuffle_inactive",
        &mut out,
        1,
        32,
        Mode::Shuffled { seed: 5 },
    )
    .unwrap();
    assert!(out[..16].iter().all(|v| v.is_nan()), "{out:?}");
    assert!(
        out[16..]
            .iter()
            .enumerate()
            .all(|(i, &v)| v == ((i + 16) ^ 1) as f32),
        "{out:?}"
    );
}

#[test]
fn atomics() {
    let mut flag = vec![0u32; 1];
    let r = lib()
        .kernel("spin_wait")
        .unwrap()
        .buffer(0, &mut flag)
        .grid([2, 1, 1])
        .threadgroup([1, 1, 1])
        .dispatch();
    expect_fault(r, FaultKind::Hang);
    // a loop that never yields is stopped by the watchdog
    let r = lib()
        .kernel("endless_loop")
        .unwrap()
        .buffer(0, &mut flag[..])
        .grid([1, 1, 1])
        .threadgroup([4, 1, 1])
        .timeout(std::time::Duration::from_millis(300))
        .dispatch();
    let f = expect_fault(r, FaultKind::Hang);
    assert!(f.message.contains("timeout"), "{f}");
    let mut counter = vec![0u32; 1];
    lib()
        .kernel("atomic_count")
        .unwrap()
        .buffer(0, &mut counter)
        .grid([4, 1, 1])
        .threadgroup([64, 1, 1])
        .mode(Mode::CheckedShuffled { seed: 9 })
        .dispatch()
        .unwrap();
    assert_eq!(counter[0], (0..256).sum::<u32>());
}

#[test]
fn simdgroup_barrier_orders_only_its_simdgroup() {
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct ExchangeParams {
        order: u32,
        cross: u32,
    }
    unsafe impl msl_harness::Pod for ExchangeParams {}
    let run = |order: u32, cross: u32, out: &mut [f32]| {
        let p = ExchangeParams { order, cross };
        lib()
            .kernel("simdgroup_exchange")?
            .buffer(0, out)
            .bytes(1, &p)
            .grid([1, 1, 1])
            .threadgroup([64, 1, 1])
            .mode(Mode::Checked)
            .dispatch()
    };
    let mut out = vec![f32::NAN; 64];
    run(0, 0, &mut out).unwrap();
    assert!(
        out.iter()
            .enumerate()
            .all(|(t, &v)| v == ((t & !31) + (t % 32 + 1) % 32) as f32),
        "{out:?}"
    );
    // no synchronisation at all: the first lane reads before its neighbour wrote
    expect_fault(run(1, 0, &mut out), FaultKind::UninitializedRead);
    for (order, cross) in [(2, 0), (0, 1)] {
        let f = expect_fault(run(order, cross, &mut out), FaultKind::Race);
        assert!(
            f.location
                .as_deref()
                .unwrap_or("")
                .ends_with(&line_of("// exchange read"))
                || f.other_location
                    .as_deref()
                    .unwrap_or("")
                    .ends_with(&line_of("// exchange read")),
            "{f}"
        );
    }
}

#[test]
fn fibre_stack_overflow() {
    let mut out = vec![0.0f32; 4];
    let f = expect_fault(
        run1("huge_private_array", &mut out, 1, 4, Mode::InOrder),
        FaultKind::StackOverflow,
    );
    assert!(f.message.contains("stack overflow"), "{f}");
}

#[test]
fn wild_pointer_is_reported_not_a_crash() {
    let mut out = vec![0.0f32; 4];
    let f = expect_fault(
        run1("wild_pointer", &mut out, 1, 4, Mode::InOrder),
        FaultKind::OutOfBounds,
    );
    assert!(f.message.contains("invalid memory access"), "{f}");
    assert!(
        f.location
            .as_deref()
            .unwrap_or("")
            .ends_with(&line_of("BUG: 4 GiB")),
        "{f}"
    );
}
