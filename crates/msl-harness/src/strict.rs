//! The strict pass's Apple-compiler rules: what MSL forbids but C++17 (the
//! language the harness compiles kernels as) allows.
//!
//! The strict pass compiles the rewritten source once more, with real address
//! spaces (`-DMSL_STRICT`), to LLVM IR at `-O0` with line tables. Each rule uses
//! the cheapest evidence that cannot miss the construct:
//!
//! * **Exceptions**: `-fno-exceptions` makes clang itself reject `throw` and
//!   `try` at parse time, templates included ("cannot use 'throw' with
//!   exceptions disabled").
//! * **`virtual` and `double` spelled in the source**: `#pragma GCC poison`
//!   (`shim/msl_strict.h`, force-included in the strict pass only). The source reaching clang was preprocessed
//!   already, so every user macro is expanded and every such token is lexed
//!   from the file, where poison fires; tokens from the shim's own macros are
//!   exempt (poison ignores macro expansions), which is what we want.
//! * **`double` not spelled**: an unsuffixed literal (`x * 0.5`) or a libm
//!   call makes C++ compute in double; MSL has no double. Found in the IR as a
//!   double-typed arithmetic, comparison, conversion, constant store or f64
//!   intrinsic located in user code. Loads, stores and call arguments of
//!   `double` type alone are not evidence: the x86-64 ABI passes 8-byte
//!   vectors such as `uint2` as `double`.
//! * **Recursion**: a cycle in the IR call graph. At `-O0` every call is
//!   explicit and nothing is inlined except the shim's `always_inline`
//!   wrappers, so the graph is the source's.
//! * **Function pointers**: an indirect call, or a function's address used as
//!   a value, in an instruction located in user code (the harness's own
//!   kernel table lives in `<msl-harness registration>` and is exempt).
//! * **Threadgroup memory**: the rewriter emits a `static_assert` summing a
//!   kernel's static `threadgroup` arrays (`msl-strict:threadgroup-memory`);
//!   the bytes a dispatch asks for are checked by [`crate::Dispatch`].
//! * **Threads per threadgroup**: `[[max_total_threads_per_threadgroup(N)]]`
//!   with `N > 1024` in the source; dispatched sizes by [`crate::Dispatch`].
//! * **Address spaces**: clang's own type errors between address spaces 1/2/3
//!   and the shim's `static_assert`s on buffer and threadgroup parameters. An
//!   error is one when the same source compiles with the address-space
//!   keywords plain (clang words these errors in many ways). Also a
//!   program-scope or `static` variable outside `constant`: an IR global
//!   outside `addrspace(2)`.

use crate::rewrite::TG_ASSERT_MARKER;
use std::fmt;

mod ir;
pub(crate) use ir::analyze_ir;

/// A construct Metal rejects, found by the strict pass or at dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Construct {
    /// `throw` / `try`: MSL has no exceptions.
    Exception,
    /// A function that calls itself, directly or through others.
    Recursion,
    /// A pointer to a function, or an indirect call.
    FunctionPointer,
    /// `virtual` functions or bases.
    VirtualFunction,
    /// The `double` type, spelled or implied (unsuffixed literals, libm).
    Double,
    /// More than 32 KiB of threadgroup memory.
    ThreadgroupMemory,
    /// More than 1024 threads per threadgroup.
    ThreadsPerThreadgroup,
    /// A pointer or reference converted between address spaces, or a
    /// `[[buffer(i)]]` / `[[threadgroup(i)]]` parameter in the wrong one.
    AddressSpace,
}

impl fmt::Display for Construct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Construct::Exception => "exceptions",
            Construct::Recursion => "recursion",
            Construct::FunctionPointer => "function pointers",
            Construct::VirtualFunction => "virtual functions",
            Construct::Double => "double",
            Construct::ThreadgroupMemory => "threadgroup memory over 32 KiB",
            Construct::ThreadsPerThreadgroup => "more than 1024 threads per threadgroup",
            Construct::AddressSpace => "address-space mismatch",
        })
    }
}

/// Where and what: the payload of [`crate::Error::Forbidden`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// What was found.
    pub construct: Construct,
    /// `.metal` file (or included header) as labelled in diagnostics.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The kernel or function it was found in, when known.
    pub function: Option<String>,
    /// Explanation (clang's diagnostics for clang-found errors).
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
        }
        write!(f, ": {} not allowed in Metal", self.construct)?;
        if let Some(func) = &self.function {
            write!(f, " (in `{func}`)")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// Classifies a failed strict compilation from clang's diagnostics; `None`
/// for an error that is no Metal rule (reported as a plain compile error).
/// `address_spaces_only`: the source compiles when the address-space
/// keywords are plain (so the error is an address-space mismatch, however
/// clang words it).
pub(crate) fn classify_clang(
    log: &str,
    address_spaces_only: bool,
    is_user: &dyn Fn(&str) -> bool,
) -> Option<Violation> {
    let lines: Vec<&str> = log.lines().collect();
    let (idx, msg) = lines
        .iter()
        .enumerate()
        .find_map(|(i, l)| l.split_once(": error: ").map(|(_, m)| (i, m)))?;
    let construct = if msg.contains("with exceptions disabled") {
        Construct::Exception
    } else if msg.contains("poisoned identifier") {
        match poisoned_word(&lines[idx + 1..]).as_deref() {
            Some("double") => Construct::Double,
            Some("virtual") => Construct::VirtualFunction,
            _ => return None,
        }
    } else if msg.contains(TG_ASSERT_MARKER) {
        Construct::ThreadgroupMemory
    } else if address_spaces_only {
        Construct::AddressSpace
    } else {
        return None;
    };
    // the first user-code location: the error itself, or the instantiation
    // note that leads to it when it fires inside the shim
    let (file, line) = lines
        .iter()
        .filter_map(|l| diag_location(l))
        .find(|(f, _)| is_user(f))
        .map(|(f, l)| (f, Some(l)))
        .unwrap_or_else(|| (String::from("<unknown>"), None));
    // the threadgroup-memory assertion names its kernel
    let function = (construct == Construct::ThreadgroupMemory)
        .then(|| {
            let rest = &log[log.find(TG_ASSERT_MARKER)?..];
            let rest = &rest[rest.find("kernel `")? + 8..];
            Some(rest[..rest.find('`')?].to_string())
        })
        .flatten();
    Some(Violation {
        construct,
        file,
        line,
        function,
        detail: log.trim_end().to_string(),
    })
}

/// `file:line` of a diagnostic line `file:line:col: error|note|warning: …`.
fn diag_location(l: &str) -> Option<(String, usize)> {
    let head = l
        .split(": error: ")
        .next()
        .filter(|h| h.len() < l.len())
        .or_else(|| l.split(": note: ").next().filter(|h| h.len() < l.len()))?;
    let mut parts = head.rsplitn(3, ':');
    let _col: usize = parts.next()?.parse().ok()?;
    let line: usize = parts.next()?.parse().ok()?;
    Some((parts.next()?.to_string(), line))
}

/// The identifier under clang's caret in the snippet following a diagnostic
/// (`  12 |   double x;` then `     |   ^`). The caret line is rendered like the
/// snippet (tabs expanded), so the index is valid in it.
fn poisoned_word(after: &[&str]) -> Option<String> {
    let (code, caret) = (after.first()?, after.get(1)?);
    let code = code.split_once(" | ")?.1;
    let caret = caret.split_once(" | ")?.1;
    let at = caret.find('^')?;
    let word: String = code
        .get(at..)?
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    Some(word)
}

/// `[[max_total_threads_per_threadgroup(N)]]` with `N > 1024` in the
/// preprocessed source (the rewriter drops kernel attributes, so this reads
/// the text before it).
pub(crate) fn thread_limits(pre: &str, label: &str) -> Option<Violation> {
    const ATTR: &str = "max_total_threads_per_threadgroup";
    let mut from = 0;
    while let Some(k) = pre[from..].find(ATTR) {
        let at = from + k;
        from = at + ATTR.len();
        let rest = pre[from..].trim_start();
        let Some(arg) = rest.strip_prefix('(') else {
            continue;
        };
        let digits: String = arg
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if let Ok(n) = digits.parse::<u64>() {
            if n > crate::MAX_THREADS_PER_THREADGROUP as u64 {
                let (file, line) = locate(pre, at, label);
                return Some(Violation {
                    construct: Construct::ThreadsPerThreadgroup,
                    file,
                    line: Some(line),
                    function: None,
                    detail: format!(
                        "[[{ATTR}({n})]]: Apple GPUs run at most {} threads per threadgroup",
                        crate::MAX_THREADS_PER_THREADGROUP
                    ),
                });
            }
        }
    }
    None
}

/// File and line of byte `pos` of preprocessed text, following its line
/// markers (`# 12 "file.metal" …` / `#line 12 "file.metal"`).
fn locate(text: &str, pos: usize, label: &str) -> (String, usize) {
    let mut file = label.to_string();
    let mut line = 1usize;
    let mut start = 0usize;
    for l in text.split_inclusive('\n') {
        if start + l.len() > pos {
            return (file, line);
        }
        start += l.len();
        let t = l.trim_start();
        let marker = t
            .strip_prefix("#line ")
            .or_else(|| t.strip_prefix("# "))
            .and_then(|r| {
                let mut it = r.trim().splitn(2, ' ');
                let n: usize = it.next()?.parse().ok()?;
                let f = it.next()?.trim_start().strip_prefix('"')?;
                Some((n, f[..f.find('"')?].to_string()))
            });
        match marker {
            Some((n, f)) => {
                line = n;
                file = f;
            }
            None => line += 1,
        }
    }
    (file, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_follows_line_markers() {
        let text = "# 1 \"a.metal\"\nx\n# 10 \"b.h\" 1\ny\nz\n";
        assert_eq!(
            locate(text, text.find('z').unwrap(), "l"),
            ("b.h".into(), 11)
        );
        assert_eq!(
            locate(text, text.find('x').unwrap(), "l"),
            ("a.metal".into(), 1)
        );
    }
}
