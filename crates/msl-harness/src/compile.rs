//! Compiling rewritten `.metal` sources with clang, with an on-disk cache
//! keyed by content hash and an in-process cache of loaded libraries.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use crate::ffi;
use crate::strict;
use crate::Error;

/// Shim and runtime sources, written to one cache directory per content hash.
const SHIM_FILES: &[(&str, &str)] = &[
    ("msl_abi.h", include_str!("../shim/msl_abi.h")),
    ("msl_shim.h", include_str!("../shim/msl_shim.h")),
    ("msl_math.h", include_str!("../shim/msl_math.h")),
    ("msl_sync.h", include_str!("../shim/msl_sync.h")),
    ("msl_strict.h", include_str!("../shim/msl_strict.h")),
    ("msl_runtime.cpp", include_str!("../shim/msl_runtime.cpp")),
    ("msl_rt_core.inc", include_str!("../shim/msl_rt_core.inc")),
    (
        "msl_rt_memory.inc",
        include_str!("../shim/msl_rt_memory.inc"),
    ),
];
/// Headers a `.metal` file may include; all resolve to the shim.
const METAL_HEADERS: &[&str] = &[
    "metal_integer",
    "metal_common",
    "metal_geometric",
    "metal_relational",
    "metal_numeric",
    "metal_types",
    "metal_stdlib",
    "metal_simdgroup",
    "metal_simdgroup_matrix",
    "metal_atomic",
    "metal_math",
    "metal_compute",
];

/// Which build of a kernel file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Flavor {
    /// Plain build, used by `InOrder` / `Shuffled`.
    Fast,
    /// `-fsanitize=thread` build whose hooks are the harness checker.
    Checked,
}

/// A kernel library loaded in this process (never unloaded).
pub struct Loaded {
    pub path: PathBuf,
    pub dispatch: ffi::DispatchFn,
    pub kernels: HashMap<String, unsafe extern "C" fn()>,
}

/// 64-bit FNV-1a, enough to key a build cache.
pub fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

struct Toolchain {
    clang: PathBuf,
    /// Hash of the clang version and every shim/runtime source.
    shim_hash: u64,
    cache: PathBuf,
    shim_dir: PathBuf,
    runtime_obj: PathBuf,
}

fn find_clang() -> Result<(PathBuf, String), Error> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(c) = std::env::var_os("MSL_HARNESS_CLANG") {
        candidates.push(c.into());
    }
    for v in (17..=25).rev() {
        candidates.push(format!("clang++-{v}").into());
    }
    candidates.push("clang++".into());
    let mut seen = Vec::new();
    for c in candidates {
        let Ok(out) = Command::new(&c).arg("--version").output() else {
            continue;
        };
        if !out.status.success() {
            continue;
        }
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let first = text.lines().next().unwrap_or("").to_string();
        let major = first
            .split("version ")
            .nth(1)
            .and_then(|v| v.split('.').next())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0);
        if major >= 17 {
            return Ok((c, first));
        }
        seen.push(format!("{} ({first})", c.display()));
    }
    Err(Error::NoCompiler(format!(
        "need clang >= 17 for _Float16/__bf16 arithmetic on x86-64 (Debian bookworm: `apt-get install clang-19`, or set MSL_HARNESS_CLANG); found: [{}]",
        seen.join(", ")
    )))
}

fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("MSL_HARNESS_CACHE_DIR") {
        return d.into();
    }
    // Test binaries live under the target dir, whose root cargo marks with
    // CACHEDIR.TAG (doc tests run from a temporary dir: fall back).
    if let Ok(exe) = std::env::current_exe() {
        if let Some(t) = exe
            .ancestors()
            .skip(1)
            .find(|d| d.join("CACHEDIR.TAG").is_file())
        {
            return t.join("msl-harness-cache");
        }
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(t).join("msl-harness-cache");
    }
    std::env::temp_dir().join("msl-harness-cache")
}

/// Writes `bytes` to `path` atomically (other test processes may race us).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = tmp_name(path);
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn tmp_name(path: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".tmp{}-{n}", std::process::id()));
    s.into()
}

fn run_clang(cmd: &mut Command, file: &str) -> Result<(), Error> {
    let out = cmd.output().map_err(|e| Error::io(Path::new("clang"), e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(Error::Compile {
        file: file.into(),
        log: String::from_utf8_lossy(&out.stderr).to_string(),
    })
}

fn toolchain() -> Result<&'static Toolchain, Error> {
    static TC: OnceLock<Result<Toolchain, String>> = OnceLock::new();
    let r = TC.get_or_init(|| {
        let build = || -> Result<Toolchain, Error> {
            let (clang, version) = find_clang()?;
            let cache = cache_root();
            std::fs::create_dir_all(&cache).map_err(|e| Error::io(&cache, e))?;
            let mut parts: Vec<&[u8]> = vec![version.as_bytes()];
            for (name, text) in SHIM_FILES {
                parts.push(name.as_bytes());
                parts.push(text.as_bytes());
            }
            let shim_hash = fnv(&parts);
            let shim_dir = cache.join(format!("shim-{shim_hash:016x}"));
            let runtime_obj = shim_dir.join("msl_runtime.o");
            // for the preprocessing pass: <metal_*> headers are empty there
            let empty = shim_dir.join("empty");
            if !empty.join(METAL_HEADERS[METAL_HEADERS.len() - 1]).exists() {
                std::fs::create_dir_all(&empty).map_err(|e| Error::io(&empty, e))?;
                for h in METAL_HEADERS {
                    write_atomic(&empty.join(h), b"")?;
                }
            }
            if !runtime_obj.exists() {
                std::fs::create_dir_all(&shim_dir).map_err(|e| Error::io(&shim_dir, e))?;
                for (name, text) in SHIM_FILES {
                    write_atomic(&shim_dir.join(name), text.as_bytes())?;
                }
                for h in METAL_HEADERS {
                    write_atomic(
                        &shim_dir.join(h),
                        b"#pragma once\n#include \"msl_shim.h\"\n",
                    )?;
                }
                let tmp = tmp_name(&runtime_obj);
                let mut cmd = Command::new(&clang);
                cmd.args([
                    "-std=c++17",
                    "-O2",
                    "-g",
                    "-fPIC",
                    "-fvisibility=hidden",
                    "-fno-exceptions",
                    "-fno-rtti",
                ])
                .arg("-c")
                .arg(shim_dir.join("msl_runtime.cpp"))
                .arg("-o")
                .arg(&tmp);
                run_clang(&mut cmd, "msl_runtime.cpp")?;
                std::fs::rename(&tmp, &runtime_obj).map_err(|e| Error::io(&runtime_obj, e))?;
            }
            Ok(Toolchain {
                clang,
                shim_hash,
                cache,
                shim_dir,
                runtime_obj,
            })
        };
        build().map_err(|e| e.to_string())
    });
    r.as_ref().map_err(|e| Error::NoCompiler(e.clone()))
}

fn common_args(tc: &Toolchain, cmd: &mut Command) {
    cmd.args([
        "-std=c++17",
        "-O1",
        "-g",
        "-fPIC",
        "-fno-exceptions",
        "-fno-rtti",
    ])
    // call sites are identified by return addresses: no tail calls; large
    // frames probe page by page so that they hit the fibre's guard page
    .args([
        "-fno-optimize-sibling-calls",
        "-fstack-clash-protection",
        "-fno-strict-aliasing",
        "-ffp-contract=off",
    ])
    // half / bfloat round after every operation, like the GPU
    .args([
        "-Xclang",
        "-ffloat16-excess-precision=none",
        "-Xclang",
        "-fbfloat16-excess-precision=none",
    ])
    .args([
        "-Wno-unknown-attributes",
        "-Wno-ignored-attributes",
        "-Wno-unused-command-line-argument",
    ])
    .arg("-I")
    .arg(&tc.shim_dir)
    .args(["-include", "msl_shim.h", "-x", "c++"]);
}

/// Runs the preprocessor alone over a `.metal` source (user macros and
/// local `#include "…"` expanded, `<metal_*>` headers empty, line markers
/// kept) so that the rewriter sees kernels instantiated through macros.
/// `__METAL_VERSION__` is 310 (Metal 3.1).
pub fn preprocess(label: &str, text: &str, include_dir: Option<&Path>) -> Result<String, Error> {
    use std::io::Write;
    let tc = toolchain()?;
    let mut cmd = Command::new(&tc.clang);
    cmd.args([
        "-E",
        "-x",
        "c++",
        "-std=c++17",
        "-D__METAL_VERSION__=310",
        "-nostdinc",
        "-I",
    ])
    .arg(tc.shim_dir.join("empty"));
    if let Some(d) = include_dir {
        cmd.arg("-iquote").arg(d);
    }
    cmd.arg("-").stdin(std::process::Stdio::piped());
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| Error::io(&tc.clang, e))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = text.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|e| Error::io(&tc.clang, e))?;
    let _ = writer.join();
    if !out.status.success() {
        let log = String::from_utf8_lossy(&out.stderr).replace("<stdin>", label);
        return Err(Error::Compile {
            file: label.into(),
            log,
        });
    }
    let quoted = format!("\"{}\"", label.replace('\\', "/"));
    Ok(String::from_utf8_lossy(&out.stdout).replace("\"<stdin>\"", &quoted))
}

/// A rewritten `.metal` file ready to compile.
pub struct Source {
    /// Path label used in diagnostics.
    pub file: String,
    /// File-name stem used for cache entries.
    pub stem: String,
    /// Content hash (see [`Source::new`]).
    pub key: u64,
    /// Rewritten C++ text.
    pub text: String,
}

impl Source {
    /// `text` is the rewritten output of [`preprocess`]ed source, so the key
    /// (text, shim, runtime, clang) covers every included header.
    pub fn new(file: &str, text: String) -> Result<Source, Error> {
        let tc = toolchain()?;
        let key = fnv(&[text.as_bytes(), &tc.shim_hash.to_le_bytes()]);
        let stem: String = Path::new(file)
            .file_stem()
            .map(|s| {
                s.to_string_lossy()
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect()
            })
            .unwrap_or_else(|| "kernel".into());
        Ok(Source {
            file: file.to_string(),
            stem,
            key,
            text,
        })
    }

    fn command(&self, tc: &Toolchain) -> Command {
        let mut cmd = Command::new(&tc.clang);
        common_args(tc, &mut cmd);
        cmd
    }
}

fn artifact(stem: &str, key: u64, suffix: &str) -> Result<PathBuf, Error> {
    Ok(toolchain()?
        .cache
        .join(format!("{stem}-{key:016x}{suffix}")))
}

fn write_source(stem: &str, key: u64, rewritten: &str) -> Result<PathBuf, Error> {
    let p = artifact(stem, key, ".cpp")?;
    if !p.exists() {
        write_atomic(&p, rewritten.as_bytes())?;
    }
    Ok(p)
}

/// The strict pass: the rewritten source compiled to LLVM IR at `-O0` with
/// real address spaces (`-DMSL_STRICT`), exceptions off and `double` /
/// `virtual` poisoned (`shim/msl_strict.h`), then the IR checked for
/// recursion, function pointers and double arithmetic; `pre` (the
/// preprocessed `.metal` text) is checked for thread-count attributes. See
/// `strict.rs` for why each check catches its construct. Cached as a marker
/// file per source and rule version.
pub fn strict_pass(src: &Source, pre: &str) -> Result<(), Error> {
    // bump when a rule changes, so old markers no longer vouch for a source
    const RULES: &str = ".strict-v3-ok";
    let marker = artifact(&src.stem, src.key, RULES)?;
    static STRICT: Mutex<()> = Mutex::new(());
    let _guard = STRICT.lock().unwrap_or_else(|p| p.into_inner());
    if marker.exists() {
        return Ok(());
    }
    let forbidden = |v| Error::Forbidden(Box::new(v));
    if let Some(v) = strict::thread_limits(pre, &src.file) {
        return Err(forbidden(v));
    }
    let tc = toolchain()?;
    let shim = tc.shim_dir.to_string_lossy().to_string();
    // code the kernel author wrote: not the shim, the system headers or the
    // harness's registration table
    let is_user = |f: &str| {
        !(f.starts_with('<')
            || f.starts_with("/usr/")
            || f.starts_with(&shim)
            || SHIM_FILES.iter().any(|(n, _)| f.ends_with(n)))
    };
    let cpp = write_source(&src.stem, src.key, &src.text)?;
    let ll = tmp_name(&artifact(&src.stem, src.key, ".ll")?);
    let mut cmd = src.command(tc);
    cmd.args(["-O0", "-gline-tables-only", "-DMSL_STRICT"])
        .args(["-include", "msl_strict.h", "-S", "-emit-llvm", "-o"])
        .arg(&ll)
        .arg(&cpp);
    let out = cmd.output().map_err(|e| Error::io(&tc.clang, e))?;
    if !out.status.success() {
        let log = String::from_utf8_lossy(&out.stderr).to_string();
        let _ = std::fs::remove_file(&ll);
        let mut plain = src.command(tc);
        plain
            .args(["-fsyntax-only", "-include", "msl_strict.h"])
            .arg(&cpp);
        let plain_ok = plain.output().is_ok_and(|o| o.status.success());
        return Err(match strict::classify_clang(&log, plain_ok, &is_user) {
            Some(v) => forbidden(v),
            None => Error::Compile {
                file: src.file.clone(),
                log,
            },
        });
    }
    let ir = std::fs::read_to_string(&ll).map_err(|e| Error::io(&ll, e));
    let _ = std::fs::remove_file(&ll);
    if let Some(v) = strict::analyze_ir(&ir?, &is_user) {
        return Err(forbidden(v));
    }
    write_atomic(&marker, b"ok\n")
}

/// Builds (or finds in the cache) and loads one flavour of a kernel file.
pub fn build(src: &Source, flavor: Flavor) -> Result<&'static Loaded, Error> {
    let suffix = match flavor {
        Flavor::Fast => "-fast.so",
        Flavor::Checked => "-checked.so",
    };
    let so = artifact(&src.stem, src.key, suffix)?;
    // One build at a time per process: tests compiling the same file from
    // several threads then share the result instead of racing clang.
    static BUILD: Mutex<()> = Mutex::new(());
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    if !so.exists() {
        let tc = toolchain()?;
        let cpp = write_source(&src.stem, src.key, &src.text)?;
        let tmp = tmp_name(&so);
        let mut cmd = src.command(tc);
        if flavor == Flavor::Checked {
            cmd.args(["-fsanitize=thread", "-fno-sanitize-link-runtime"]);
        }
        cmd.arg(&cpp).args(["-x", "none"]).arg(&tc.runtime_obj);
        cmd.args(["-shared", "-Wl,-Bsymbolic", "-o"]).arg(&tmp);
        run_clang(&mut cmd, &src.file)?;
        std::fs::rename(&tmp, &so).map_err(|e| Error::io(&so, e))?;
    }
    load(&so)
}

fn load(so: &Path) -> Result<&'static Loaded, Error> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, &'static Loaded>>> = OnceLock::new();
    let mut map = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(l) = map.get(so) {
        return Ok(l);
    }
    let load_err = |msg: String| Error::Load {
        path: so.display().to_string(),
        message: msg,
    };
    let c = CString::new(so.as_os_str().as_encoded_bytes()).map_err(|e| load_err(e.to_string()))?;
    // SAFETY: plain dlopen/dlsym on a library we just built; the symbols have
    // the types declared in msl_abi.h.
    unsafe {
        let h = ffi::dlopen(c.as_ptr(), ffi::RTLD_NOW);
        if h.is_null() {
            let e = ffi::dlerror();
            let msg = if e.is_null() {
                "dlopen failed".into()
            } else {
                CStr::from_ptr(e).to_string_lossy().into()
            };
            return Err(load_err(msg));
        }
        let d = ffi::dlsym(h, c"msl_dispatch".as_ptr());
        let t = ffi::dlsym(h, c"msl_kernels".as_ptr()) as *const ffi::KernelEntry;
        if d.is_null() || t.is_null() {
            return Err(load_err("missing msl_dispatch / msl_kernels".into()));
        }
        let dispatch: ffi::DispatchFn =
            std::mem::transmute::<*mut std::ffi::c_void, ffi::DispatchFn>(d);
        let mut kernels = HashMap::new();
        let mut e = t;
        while !(*e).name.is_null() {
            if let Some(f) = (*e).func {
                kernels.insert(CStr::from_ptr((*e).name).to_string_lossy().into_owned(), f);
            }
            e = e.add(1);
        }
        let l: &'static Loaded = Box::leak(Box::new(Loaded {
            path: so.to_path_buf(),
            dispatch,
            kernels,
        }));
        map.insert(so.to_path_buf(), l);
        Ok(l)
    }
}

/// `file:line` of a code offset inside a kernel library, preferring the
/// innermost frame that lies in a `.metal` file (not in the shim).
pub fn symbolize(so: &Path, offset: u64) -> Option<String> {
    if offset == 0 {
        return None;
    }
    let out = Command::new("addr2line")
        .arg("-e")
        .arg(so)
        .arg("-i")
        .arg(format!("{:#x}", offset - 1))
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let frames: Vec<&str> = text.lines().filter(|l| !l.starts_with("??")).collect();
    // innermost frame in a .metal file, else the innermost outside the shim
    let pick = frames
        .iter()
        .find(|l| l.contains(".metal:"))
        .or_else(|| {
            frames
                .iter()
                .find(|l| !l.contains("/shim-") && !l.contains("<msl-harness"))
        })
        .or(frames.first())?;
    Some(
        pick.split(" (discriminator")
            .next()
            .unwrap_or(pick)
            .trim()
            .to_string(),
    )
}
