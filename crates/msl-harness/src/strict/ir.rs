//! The IR half of the strict pass: recursion, function pointers, implied `double` and
//! program-scope variables, found in the LLVM IR (`-O0`, line tables) of a rewritten source.
//! Why each is evidence enough: see the parent module.

use super::{Construct, Violation};
use std::collections::{HashMap, HashSet};

/// One `define`d function of the IR.
struct Func<'a> {
    name: &'a str,
    /// `!dbg` of the definition: its `DISubprogram`.
    sp: Option<u32>,
    body: Vec<&'a str>,
}

struct Ir<'a> {
    meta: HashMap<u32, &'a str>,
    funcs: Vec<Func<'a>>,
    /// Every function defined or declared.
    names: HashSet<&'a str>,
}

/// Checks emitted LLVM IR for recursion, function pointers and double
/// arithmetic in user code; the first violation found, in that order.
pub(crate) fn analyze_ir(ir: &str, is_user: &dyn Fn(&str) -> bool) -> Option<Violation> {
    let parsed = parse(ir);
    recursion(&parsed)
        .or_else(|| instructions(&parsed, is_user, Construct::FunctionPointer))
        .or_else(|| instructions(&parsed, is_user, Construct::Double))
        .or_else(|| program_scope(&parsed, ir, is_user))
}

/// A program-scope (or function-`static`) variable outside the `constant` address space: MSL
/// has no other memory that outlives a thread but buffers. In the IR such a variable is a
/// global outside `addrspace(2)`; string literals (`unnamed_addr`) and the harness's kernel
/// table are not variables of the kernel. Reported at its first use in user code.
fn program_scope(ir: &Ir, text: &str, is_user: &dyn Fn(&str) -> bool) -> Option<Violation> {
    for line in text.lines().filter(|l| l.starts_with('@')) {
        let Some((lhs, rhs)) = line.split_once(" = ") else {
            continue;
        };
        let Some(name) = global_after(lhs, 0) else {
            continue;
        };
        let kind = rhs.split_whitespace();
        let words: Vec<&str> = kind
            .take_while(|w| *w != "global" && *w != "constant")
            .collect();
        let defined = !words.contains(&"external") && !words.contains(&"extern_weak");
        if !defined
            || words.contains(&"unnamed_addr")
            || words.contains(&"addrspace(2)")
            || name == "msl_kernels"
            || name.starts_with("llvm.")
        {
            continue;
        }
        let needle = format!("@{name}");
        for f in &ir.funcs {
            for instr in &f.body {
                let used = instr
                    .match_indices(&needle)
                    .any(|(i, _)| global_after(instr, i) == Some(name));
                if !used {
                    continue;
                }
                let Some((file, line)) = ir.location(instr).filter(|(f, _)| is_user(f)) else {
                    continue;
                };
                return Some(Violation {
                    construct: Construct::AddressSpace,
                    file: file.to_string(),
                    line: Some(line),
                    function: Some(ir.subprogram(f).0),
                    detail: format!(
                        "program-scope or static variable `{name}` (used here) is not in the `constant` address space, the only one MSL allows for it"
                    ),
                });
            }
        }
    }
    None
}

fn parse(text: &str) -> Ir<'_> {
    let mut ir = Ir {
        meta: HashMap::new(),
        funcs: Vec::new(),
        names: HashSet::new(),
    };
    let mut cur: Option<Func> = None;
    for line in text.lines() {
        if let Some(f) = cur.as_mut() {
            if line == "}" {
                ir.funcs.extend(cur.take());
            } else {
                f.body.push(line);
            }
            continue;
        }
        if line.starts_with("define ") || line.starts_with("declare ") {
            let Some(name) = global_after(line, line.find('@').unwrap_or(line.len())) else {
                continue;
            };
            ir.names.insert(name);
            if line.starts_with("define ") {
                cur = Some(Func {
                    name,
                    sp: dbg_ref(line),
                    body: Vec::new(),
                });
            }
        } else if let Some(rest) = line.strip_prefix('!') {
            if let Some((id, rhs)) = rest.split_once(" = ") {
                if let Ok(id) = id.parse::<u32>() {
                    ir.meta.insert(id, rhs);
                }
            }
        }
    }
    ir
}

/// The global name starting with the `@` at byte `at` (quoted names included).
fn global_after(line: &str, at: usize) -> Option<&str> {
    let rest = line.get(at..)?.strip_prefix('@')?;
    if let Some(q) = rest.strip_prefix('"') {
        return Some(&q[..q.find('"')?]);
    }
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || "_.$-".contains(c)))
        .unwrap_or(rest.len());
    (end > 0).then(|| &rest[..end])
}

/// `N` of a trailing `!dbg !N`.
fn dbg_ref(line: &str) -> Option<u32> {
    field_ref(&line[line.rfind("!dbg ")?..], "!dbg")
}

/// `N` of `key !N` (e.g. `scope: !12`).
fn field_ref(text: &str, key: &str) -> Option<u32> {
    let rest = &text[text.find(key)? + key.len()..];
    let rest = rest.trim_start_matches([':', ' ']).strip_prefix('!')?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// `N` of `line: N`.
fn field_num(text: &str, key: &str) -> Option<usize> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits: String = rest
        .trim_start_matches([':', ' '])
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

impl Ir<'_> {
    /// File of a debug scope (subprogram or lexical block), walking outwards.
    fn scope_file(&self, mut id: u32) -> Option<&str> {
        for _ in 0..64 {
            let t = self.meta.get(&id)?;
            if let Some(f) = field_ref(t, "file:") {
                let ft = self.meta.get(&f)?;
                let name = &ft[ft.find("filename: \"")? + 11..];
                return Some(&name[..name.find('"')?]);
            }
            id = field_ref(t, "scope:")?;
        }
        None
    }

    /// File and line of an instruction's `!dbg` location.
    fn location(&self, instr: &str) -> Option<(&str, usize)> {
        let loc = self.meta.get(&dbg_ref(instr)?)?;
        let line = field_num(loc, "line:")?;
        Some((self.scope_file(field_ref(loc, "scope:")?)?, line))
    }

    /// Source name, file and line of a function's subprogram.
    fn subprogram(&self, f: &Func) -> (String, Option<(String, usize)>) {
        let Some(sp) = f.sp.and_then(|s| self.meta.get(&s)) else {
            return (f.name.to_string(), None);
        };
        let name = sp
            .find("name: \"")
            .map(|k| &sp[k + 7..])
            .and_then(|r| r.find('"').map(|e| r[..e].to_string()))
            .unwrap_or_else(|| f.name.to_string());
        let at =
            f.sp.and_then(|s| self.scope_file(s))
                .zip(field_num(sp, "line:"))
                .map(|(file, line)| (file.to_string(), line));
        (name, at)
    }
}

/// The callee of a `call` instruction: `Ok(name)` for `@name(`, `Err(())` for
/// an indirect call through a value (`%5(`); `None` when not a call.
fn callee(instr: &str) -> Option<Result<&str, ()>> {
    let body = instr
        .split_once(" = ")
        .map_or(instr, |(_, r)| r)
        .trim_start();
    let body = body
        .strip_prefix("tail ")
        .or_else(|| body.strip_prefix("notail "))
        .unwrap_or(body);
    let rest = body.strip_prefix("call ")?;
    if rest.contains(" asm ") {
        return None;
    }
    // the first `@x(` or `%x(` token is the callee (return types hold neither)
    for (i, c) in rest.char_indices() {
        if c == '@' || c == '%' {
            let name_end = match rest[i + 1..].strip_prefix('"') {
                Some(q) => q.find('"').map_or(rest.len(), |e| i + 3 + e),
                None => rest[i + 1..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || "_.$-".contains(c)))
                    .map_or(rest.len(), |e| i + 1 + e),
            };
            if rest[name_end..].starts_with('(') {
                return Some(if c == '@' {
                    global_after(rest, i).ok_or(())
                } else {
                    Err(())
                });
            }
        }
    }
    None
}

fn recursion(ir: &Ir) -> Option<Violation> {
    let index: HashMap<&str, usize> = ir
        .funcs
        .iter()
        .enumerate()
        .map(|(i, f)| (f.name, i))
        .collect();
    let edges: Vec<Vec<usize>> = ir
        .funcs
        .iter()
        .map(|f| {
            f.body
                .iter()
                .filter_map(|l| callee(l)?.ok())
                .filter_map(|n| index.get(n).copied())
                .collect()
        })
        .collect();
    // a function is recursive when it reaches itself: DFS from each (the
    // graphs of kernel files are small)
    for start in 0..ir.funcs.len() {
        let mut parent = vec![usize::MAX; ir.funcs.len()];
        let mut stack = vec![start];
        let mut seen = vec![false; ir.funcs.len()];
        while let Some(v) = stack.pop() {
            for &w in &edges[v] {
                if w == start {
                    let mut cycle = vec![start];
                    let mut u = v;
                    while u != start {
                        cycle.push(u);
                        u = parent[u];
                    }
                    cycle.push(start);
                    let n = cycle.len();
                    cycle[1..n - 1].reverse();
                    return Some(recursion_violation(ir, &cycle));
                }
                if !seen[w] {
                    seen[w] = true;
                    parent[w] = v;
                    stack.push(w);
                }
            }
        }
    }
    None
}

fn recursion_violation(ir: &Ir, cycle: &[usize]) -> Violation {
    let names: Vec<String> = cycle
        .iter()
        .map(|&i| ir.subprogram(&ir.funcs[i]).0)
        .collect();
    let (function, at) = ir.subprogram(&ir.funcs[cycle[0]]);
    let (file, line) = match at {
        Some((f, l)) => (f, Some(l)),
        None => ("<unknown>".into(), None),
    };
    Violation {
        construct: Construct::Recursion,
        file,
        line,
        function: Some(function),
        detail: format!(
            "call cycle {} (Metal has no call stack to recurse on)",
            names.join(" -> ")
        ),
    }
}

/// Function-pointer or double evidence in instructions located in user code.
fn instructions(ir: &Ir, is_user: &dyn Fn(&str) -> bool, what: Construct) -> Option<Violation> {
    for f in &ir.funcs {
        for instr in &f.body {
            let found = match what {
                Construct::FunctionPointer => function_pointer(ir, instr),
                _ => double_op(instr),
            };
            let Some(detail) = found else { continue };
            let Some((file, line)) = ir.location(instr).filter(|(f, _)| is_user(f)) else {
                continue;
            };
            return Some(Violation {
                construct: what,
                file: file.to_string(),
                line: Some(line),
                function: Some(ir.subprogram(f).0),
                detail,
            });
        }
    }
    None
}

fn function_pointer(ir: &Ir, instr: &str) -> Option<String> {
    let direct = match callee(instr) {
        Some(Err(())) => return Some("indirect call through a function pointer".into()),
        Some(Ok(name)) => Some(name),
        None => None,
    };
    let code = instr.split(", !dbg").next().unwrap_or(instr);
    let mut skipped_callee = false;
    for (i, _) in code.match_indices('@') {
        let Some(name) = global_after(code, i) else {
            continue;
        };
        if Some(name) == direct && !skipped_callee {
            skipped_callee = true;
            continue;
        }
        if ir.names.contains(name) {
            return Some(format!("the address of function `{name}` is taken"));
        }
    }
    None
}

fn double_op(instr: &str) -> Option<String> {
    let code = instr.split(", !dbg").next().unwrap_or(instr);
    let body = code.split_once(" = ").map_or(code, |(_, r)| r).trim_start();
    let op = body.split_whitespace().next()?;
    let arith = matches!(
        op,
        "fadd"
            | "fsub"
            | "fmul"
            | "fdiv"
            | "frem"
            | "fneg"
            | "fcmp"
            | "fptrunc"
            | "fptosi"
            | "fptoui"
    ) && body.contains(" double");
    let to_double = matches!(op, "fpext" | "sitofp" | "uitofp") && body.ends_with(" to double");
    let constant_store = op == "store"
        && body
            .strip_prefix("store double ")
            .is_some_and(|v| !v.starts_with('%'));
    let local = op == "alloca" && body.starts_with("alloca double");
    let intrinsic = body.contains(".f64(");
    (arith || to_double || constant_store || local || intrinsic).then(|| {
        format!(
            "double-precision `{op}` (MSL has no double: an unsuffixed literal such as `0.5` or a libm call makes C++ compute in double; write `0.5f` / the float overload)"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callee_forms() {
        assert_eq!(
            callee("  %3 = call noundef float @_Z1ff(float 1.0), !dbg !4"),
            Some(Ok("_Z1ff"))
        );
        assert_eq!(callee("  call void @\"odd name\"()"), Some(Ok("odd name")));
        assert_eq!(
            callee("  %12 = call noundef float %6(float noundef %11)"),
            Some(Err(()))
        );
        assert_eq!(
            callee("  %r = call ptr addrspace(1) @g(ptr addrspace(1) %p)"),
            Some(Ok("g"))
        );
        assert_eq!(callee("  store float %1, ptr %2"), None);
    }

    #[test]
    fn double_evidence_ignores_abi_coercion() {
        assert!(double_op("  %30 = fmul double %29, 5.000000e-01, !dbg !27").is_some());
        assert!(double_op("  %29 = fpext float %28 to double, !dbg !25").is_some());
        assert!(double_op("  store double 1.000000e+00, ptr %d, align 8").is_some());
        // uint2 travels as `double` in the x86-64 ABI: not evidence
        assert!(double_op("  %113 = load double, ptr %21, align 8, !dbg !2751").is_none());
        assert!(double_op("  store double %113, ptr %30, align 8, !dbg !2720").is_none());
    }
}
