//! Source rewriter: turns a `.metal` file into C++ that the shim header can
//! compile, without parsing C++ types.
//!
//! * every kernel parameter attribute (`[[buffer(i)]]`, `[[threadgroup(i)]]`,
//!   builtins such as `[[thread_position_in_grid]]`) becomes a default
//!   argument that reads the current emulated thread's binding, so a kernel
//!   is then called with no arguments;
//! * `threadgroup` variable declarations inside kernels become references
//!   into the per-dispatch threadgroup arena (poisoned, budgeted), and each
//!   kernel gets a `static_assert` that its arrays total at most 32 KiB;
//! * explicit template instantiations carrying `[[host_name("…")]]` are
//!   registered under that name;
//! * a table `msl_kernels` of `{name, entry}` is appended.
//!
//! Line numbers are preserved (`#line` + no added newlines) so compiler
//! diagnostics and the checker's reports point into the `.metal` file.
//! Usable from `build.rs` (no dependencies).

use std::fmt;

/// Builtin kernel attributes the harness can bind.
pub const BUILTINS: &[&str] = &[
    "thread_position_in_grid",
    "threadgroup_position_in_grid",
    "thread_position_in_threadgroup",
    "threads_per_threadgroup",
    "threadgroups_per_grid",
    "threads_per_grid",
    "dispatch_threads_per_threadgroup",
    "grid_origin",
    "grid_size",
    "thread_index_in_threadgroup",
    "thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup",
    "threads_per_simdgroup",
    "simdgroups_per_threadgroup",
    "dispatch_simdgroups_per_threadgroup",
    "thread_execution_width",
    "thread_index_in_quadgroup",
    "quadgroup_index_in_threadgroup",
    "quadgroups_per_threadgroup",
];

/// Marker in the message of the `static_assert` the rewriter adds on each
/// kernel's static threadgroup memory (the strict pass classifies by it).
pub const TG_ASSERT_MARKER: &str = "msl-strict:threadgroup-memory";

/// A kernel the rewritten source registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInfo {
    /// Name used to look the kernel up (its `host_name`, or the function name).
    pub name: String,
    /// C++ expression called once per emulated thread, e.g. `scan<float>`.
    pub call: String,
    /// 1-based line in the `.metal` file.
    pub line: usize,
}

/// Result of [`rewrite`].
#[derive(Debug, Clone)]
pub struct Rewritten {
    /// C++ source, to be compiled with the shim header force-included.
    pub source: String,
    /// Registered kernels, in source order.
    pub kernels: Vec<KernelInfo>,
}

/// A construct the rewriter does not support, with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewriteError {
    /// File label given to [`rewrite`].
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for RewriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

impl std::error::Error for RewriteError {}

struct Edit {
    start: usize,
    end: usize,
    text: String,
}

struct Ctx<'a> {
    src: &'a str,
    m: Vec<u8>, // masked source: comments and literals blanked
    file: &'a str,
    edits: Vec<Edit>,
    /// `{`…`}` byte ranges and names of kernel definitions.
    bodies: Vec<(usize, usize, String)>,
}

/// Rewrites one `.metal` source. `file` is the path recorded in `#line`
/// directives (and so in diagnostics and checker reports).
pub fn rewrite(src: &str, file: &str) -> Result<Rewritten, RewriteError> {
    let mut cx = Ctx {
        src,
        m: mask(src),
        file,
        edits: Vec::new(),
        bodies: Vec::new(),
    };
    let mut kernels = Vec::new();
    cx.kernels(&mut kernels)?;
    cx.threadgroup_decls()?;
    cx.half_literals();
    cx.vec_constructors();
    cx.edits.sort_by_key(|e| e.start);
    let mut out = String::with_capacity(src.len() + 4096);
    out.push_str(&format!("#line 1 \"{}\"\n", file.replace('\\', "/")));
    let mut pos = 0;
    for e in &cx.edits {
        if e.start < pos {
            return Err(cx.err(e.start, "overlapping rewrites (unsupported construct)"));
        }
        out.push_str(&src[pos..e.start]);
        out.push_str(&e.text);
        pos = e.end;
    }
    out.push_str(&src[pos..]);
    out.push_str("\n#line 1 \"<msl-harness registration>\"\n");
    out.push_str("extern \"C\" __attribute__((visibility(\"default\"))) const msl_kernel_entry msl_kernels[] = {\n");
    for k in &kernels {
        out.push_str(&format!(
            "  {{\"{}\", []() {{ {}(); }}}},\n",
            k.name, k.call
        ));
    }
    out.push_str("  {nullptr, nullptr}};\n");
    Ok(Rewritten {
        source: out,
        kernels,
    })
}

/// Blanks comments, string and character literals (keeping newlines and
/// byte offsets) so that searches never match inside them.
fn mask(src: &str) -> Vec<u8> {
    let b = src.as_bytes();
    let mut m = b.to_vec();
    let mut i = 0;
    let blank = |m: &mut Vec<u8>, from: usize, to: usize| {
        for c in m.iter_mut().take(to).skip(from) {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    while i < b.len() {
        if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'/' {
            let end = b[i..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |p| i + p);
            blank(&mut m, i, end);
            i = end;
        } else if b[i] == b'/' && i + 1 < b.len() && b[i + 1] == b'*' {
            let end = src[i + 2..].find("*/").map_or(b.len(), |p| i + 2 + p + 2);
            blank(&mut m, i, end);
            i = end;
        } else if b[i] == b'"' || b[i] == b'\'' {
            let q = b[i];
            let mut j = i + 1;
            while j < b.len() && b[j] != q {
                if b[j] == b'\\' {
                    j += 1;
                }
                j += 1;
            }
            blank(&mut m, i + 1, j.min(b.len()));
            i = j + 1;
        } else if b[i] == b'#'
            && (i == 0
                || b[..i]
                    .iter()
                    .rev()
                    .take_while(|&&c| c != b'\n')
                    .all(|c| c.is_ascii_whitespace()))
        {
            // preprocessor line (with continuations): not C++ to rewrite
            let mut j = i;
            while j < b.len() && b[j] != b'\n' {
                if b[j] == b'\\' && j + 1 < b.len() && b[j + 1] == b'\n' {
                    j += 1;
                }
                j += 1;
            }
            blank(&mut m, i, j);
            i = j;
        } else {
            i += 1;
        }
    }
    m
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

impl Ctx<'_> {
    /// File and line of `pos`, following preprocessor line markers
    /// (`# 12 "file.metal"`) when the source went through `clang -E`.
    fn location(&self, pos: usize) -> (String, usize) {
        let before = &self.src[..pos.min(self.src.len())];
        let mut file = self.file.to_string();
        let mut line = 1;
        let mut lines = before.split('\n').peekable();
        while let Some(l) = lines.next() {
            if lines.peek().is_none() {
                break; // the line holding `pos`
            }
            line += 1;
            let t = l.trim_start();
            if let Some(rest) = t.strip_prefix("# ").or_else(|| t.strip_prefix("#line ")) {
                let mut parts = rest.splitn(2, ' ');
                if let Some(n) = parts.next().and_then(|n| n.parse::<usize>().ok()) {
                    line = n;
                    if let Some(f) = parts.next().and_then(|f| f.split('"').nth(1)) {
                        file = f.to_string();
                    }
                }
            }
        }
        (file, line)
    }

    fn line_of(&self, pos: usize) -> usize {
        self.location(pos).1
    }

    fn err(&self, pos: usize, msg: impl Into<String>) -> RewriteError {
        let (file, line) = self.location(pos);
        RewriteError {
            file,
            line,
            message: msg.into(),
        }
    }

    /// Positions of the whole word `w` in the masked source.
    fn words(&self, w: &str) -> Vec<usize> {
        let wb = w.as_bytes();
        let m = &self.m;
        let mut v = Vec::new();
        let mut i = 0;
        while i + wb.len() <= m.len() {
            if &m[i..i + wb.len()] == wb
                && (i == 0 || !is_ident(m[i - 1]))
                && (i + wb.len() == m.len() || !is_ident(m[i + wb.len()]))
            {
                v.push(i);
                i += wb.len();
            } else {
                i += 1;
            }
        }
        v
    }

    /// Index of the bracket matching the opening one at `open`.
    fn matching(&self, open: usize) -> Option<usize> {
        let (o, c) = match self.m[open] {
            b'(' => (b'(', b')'),
            b'[' => (b'[', b']'),
            b'{' => (b'{', b'}'),
            b'<' => (b'<', b'>'),
            _ => return None,
        };
        let mut depth = 0usize;
        for (i, &ch) in self.m.iter().enumerate().skip(open) {
            if ch == o {
                depth += 1;
            } else if ch == c {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
        }
        None
    }

    /// Replacement keeping the number of newlines of the replaced range.
    fn replace(&mut self, start: usize, end: usize, text: &str) {
        let nl = self.src[start..end].matches('\n').count();
        let mut t = text.to_string();
        t.push_str(&"\n".repeat(nl));
        self.edits.push(Edit {
            start,
            end,
            text: t,
        });
    }

    fn blank(&mut self, start: usize, end: usize) {
        let t: String = self.src[start..end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        self.edits.push(Edit {
            start,
            end,
            text: t,
        });
    }

    /// Attributes `[[...]]` in `[from, to)`: (start, end_exclusive, inner text).
    fn attributes(&self, from: usize, to: usize) -> Vec<(usize, usize, String)> {
        let mut v = Vec::new();
        let mut i = from;
        while i + 1 < to {
            if self.m[i] == b'[' && self.m[i + 1] == b'[' {
                if let Some(close) = self.matching(i) {
                    // `[[ x ]]`: matching of the outer '[' is the last ']'
                    let inner = &self.src[i + 2..close - 1];
                    v.push((i, close + 1, inner.trim().to_string()));
                    i = close + 1;
                    continue;
                }
            }
            i += 1;
        }
        v
    }

    fn kernels(&mut self, out: &mut Vec<KernelInfo>) -> Result<(), RewriteError> {
        let mut starts = self.words("kernel");
        // `[[kernel]]` attribute form counts as the keyword too
        starts.retain(|&p| !(p >= 2 && &self.m[p - 2..p] == b"[["));
        for a in self.attributes(0, self.m.len()) {
            if a.2 == "kernel" {
                starts.push(a.0); // blanked with the kernel's other attributes
            }
        }
        starts.sort_unstable();
        for p in starts {
            self.kernel_at(p, out)?;
        }
        Ok(())
    }

    fn statement_start(&self, p: usize) -> usize {
        let mut depth = 0i32;
        let mut i = p;
        while i > 0 {
            let c = self.m[i - 1];
            match c {
                b')' | b']' => depth += 1,
                b'(' | b'[' => depth -= 1,
                b';' | b'{' | b'}' if depth <= 0 => return i,
                _ => {}
            }
            i -= 1;
        }
        0
    }

    fn kernel_at(&mut self, p: usize, out: &mut Vec<KernelInfo>) -> Result<(), RewriteError> {
        // find the end of the declaration: '{' (definition) or ';'
        let mut i = p;
        let mut depth = 0i32;
        let end = loop {
            if i >= self.m.len() {
                return Err(self.err(p, "kernel declaration does not end"));
            }
            match self.m[i] {
                b'(' | b'[' => depth += 1,
                b')' | b']' => depth -= 1,
                b'{' | b';' if depth == 0 => break i,
                _ => {}
            }
            i += 1;
        };
        let stmt = self.statement_start(p);
        let attrs = self.attributes(stmt, end);
        let host = attrs.iter().find_map(|a| host_name(&a.2));
        if self.m[end] == b';' {
            // explicit instantiation (or plain declaration): register, then drop
            if let Some(host) = host {
                let head_end = (p..end).find(|&k| self.m[k] == b'(').unwrap_or(end);
                let call = self.template_id(p, head_end).ok_or_else(|| {
                    self.err(p, "cannot find the template-id (`name<args>`) of this host_name instantiation")
                })?;
                out.push(KernelInfo {
                    name: host,
                    call,
                    line: self.line_of(p),
                });
            }
            self.blank(stmt, end + 1);
            return Ok(());
        }
        // definition
        let open = (p..end)
            .find(|&k| self.m[k] == b'(')
            .ok_or_else(|| self.err(p, "kernel without parameter list"))?;
        let close = self
            .matching(open)
            .ok_or_else(|| self.err(open, "unbalanced parentheses"))?;
        let name = ident_before(&self.m, open)
            .ok_or_else(|| self.err(p, "cannot find the kernel name"))?;
        let name = self.src[name.0..name.1].to_string();
        for a in &attrs {
            if a.1 <= open {
                self.blank(a.0, a.1);
            }
        }
        self.params(open, close, &name)?;
        if let Some(body_end) = self.matching(end) {
            self.bodies.push((end, body_end, name.clone()));
        }
        if !self.is_template(stmt, p) {
            out.push(KernelInfo {
                name: host.unwrap_or_else(|| name.clone()),
                call: name,
                line: self.line_of(p),
            });
        }
        Ok(())
    }

    fn is_template(&self, stmt: usize, p: usize) -> bool {
        let head = String::from_utf8_lossy(&self.m[stmt..p]);
        head.split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .any(|w| w == "template")
    }

    /// Last `ident<...>` in `[from, to)`, e.g. `scan<float, 64>`.
    fn template_id(&self, from: usize, to: usize) -> Option<String> {
        let mut found = None;
        let mut i = from;
        while i < to {
            if self.m[i] == b'<' {
                if let Some((s, _)) = ident_before(&self.m, i) {
                    let w = &self.src[s..i].trim_end();
                    if *w != "template" {
                        if let Some(c) = self.matching(i) {
                            if c < to {
                                found = Some(self.src[s..=c].to_string());
                                i = c;
                            }
                        }
                    }
                }
            }
            i += 1;
        }
        found
    }

    fn params(&mut self, open: usize, close: usize, kernel: &str) -> Result<(), RewriteError> {
        // split on top-level commas
        let mut parts = Vec::new();
        let mut depth = 0i32;
        let mut s = open + 1;
        for k in open + 1..close {
            match self.m[k] {
                b'(' | b'[' | b'<' | b'{' => depth += 1,
                b')' | b']' | b'>' | b'}' => depth -= 1,
                b',' if depth == 0 => {
                    parts.push((s, k));
                    s = k + 1;
                }
                _ => {}
            }
        }
        parts.push((s, close));
        for (a, b) in parts {
            let text = self.src[a..b].trim();
            if text.is_empty() || text == "void" {
                continue;
            }
            let attrs = self.attributes(a, b);
            // C++ attributes such as [[maybe_unused]] may sit next to the binding one
            let standard = |a: &str| matches!(a, "maybe_unused" | "deprecated");
            let Some(k) = attrs.iter().position(|at| !standard(&at.2)) else {
                return Err(self.err(
                    a,
                    format!(
                        "parameter `{text}` of kernel `{kernel}` has no attribute: every kernel parameter needs an explicit [[buffer(i)]], [[threadgroup(i)]] or builtin attribute"
                    ),
                ));
            };
            let (as_, ae, inner) = attrs[k].clone();
            let repl = if let Some(i) = call_arg(&inner, "buffer") {
                format!("= MSL_BUFFER({i})")
            } else if let Some(i) = call_arg(&inner, "threadgroup") {
                format!("= MSL_TG_ARG({i})")
            } else if BUILTINS.contains(&inner.as_str()) {
                format!("= MSL_BUILTIN({inner})")
            } else {
                return Err(self.err(
                    as_,
                    format!("kernel `{kernel}`: unsupported parameter attribute [[{inner}]]"),
                ));
            };
            for (n, other) in attrs.iter().enumerate() {
                if n == k {
                    continue;
                }
                if !standard(&other.2) {
                    return Err(self.err(
                        other.0,
                        format!("kernel `{kernel}`: more than one binding attribute on `{text}`"),
                    ));
                }
                self.blank(other.0, other.1);
            }
            // the default argument goes where the binding attribute was, after the name
            self.replace(as_, ae, &repl);
        }
        Ok(())
    }

    /// `vec<T, N>(args)` is a converting constructor in MSL but a bit cast
    /// for clang vectors: route it to the shim's constructor.
    fn vec_constructors(&mut self) {
        let mut hits = Vec::new();
        for p in self.words("vec") {
            let Some(lt) = (p + 3..self.m.len()).find(|&k| !self.m[k].is_ascii_whitespace()) else {
                continue;
            };
            if self.m[lt] != b'<' {
                continue;
            }
            let Some(gt) = self.matching(lt) else {
                continue;
            };
            let next = (gt + 1..self.m.len()).find(|&k| !self.m[k].is_ascii_whitespace());
            if next.map(|k| self.m[k]) != Some(b'(') {
                continue;
            }
            let mut start = p;
            let before = String::from_utf8_lossy(&self.m[p.saturating_sub(16)..p])
                .trim_end()
                .to_string();
            if let Some(q) = before.strip_suffix("::") {
                if q.trim_end().ends_with("metal") {
                    let drop = before.len() - (q.trim_end().len() - "metal".len());
                    start = p - drop;
                }
            }
            hits.push((start, p + 3));
        }
        for (s, e) in hits {
            self.replace(s, e, "::msl::detail::make_vec");
        }
    }

    /// MSL half literals (`1.0h`, `2h`) become `((half)1.0f)`.
    fn half_literals(&mut self) {
        let m = &self.m;
        let mut lits = Vec::new();
        let mut i = 0;
        while i < m.len() {
            let starts_number = m[i].is_ascii_digit()
                || (m[i] == b'.' && i + 1 < m.len() && m[i + 1].is_ascii_digit());
            if starts_number && (i == 0 || !is_ident(m[i - 1])) {
                let s = i;
                while i < m.len()
                    && (is_ident(m[i])
                        || m[i] == b'.'
                        || ((m[i] == b'+' || m[i] == b'-') && matches!(m[i - 1], b'e' | b'E')))
                {
                    i += 1;
                }
                let tok = &self.src[s..i];
                let hex = tok.starts_with("0x") || tok.starts_with("0X");
                if !hex && (tok.ends_with('h') || tok.ends_with('H')) {
                    let body = &tok[..tok.len() - 1];
                    if body.bytes().all(|c| {
                        c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'+' | b'-')
                    }) {
                        let f = if body.contains(['.', 'e', 'E']) {
                            format!("{body}f")
                        } else {
                            format!("{body}.0f")
                        };
                        lits.push((s, i, format!("((half){f})")));
                    }
                }
            } else {
                i += 1;
            }
        }
        for (s, e, t) in lits {
            self.replace(s, e, &t);
        }
    }

    /// `threadgroup T name[dims];` inside function bodies.
    fn threadgroup_decls(&mut self) -> Result<(), RewriteError> {
        // brace depth at each position
        let mut depth = vec![0i32; self.m.len() + 1];
        let mut paren = vec![0i32; self.m.len() + 1];
        let (mut d, mut pd) = (0i32, 0i32);
        for (i, &c) in self.m.iter().enumerate() {
            depth[i] = d;
            paren[i] = pd;
            match c {
                b'{' => d += 1,
                b'}' => d -= 1,
                b'(' => pd += 1,
                b')' => pd -= 1,
                _ => {}
            }
        }
        let mut slot = 0u32;
        let mut decls: Vec<(usize, usize, String, String)> = Vec::new();
        for p in self.words("threadgroup") {
            if depth[p] <= 0 || paren[p] != 0 {
                continue;
            }
            let prev = self.m[..p]
                .iter()
                .rev()
                .find(|c| !c.is_ascii_whitespace())
                .copied();
            if !matches!(prev, Some(b'{') | Some(b';') | Some(b'}') | Some(b':')) {
                continue;
            }
            let Some(semi) = (p..self.m.len()).find(|&k| self.m[k] == b';') else {
                continue;
            };
            let body = &self.src[p + "threadgroup".len()..semi];
            // a pointer or reference variable, not threadgroup storage; array bounds such as
            // `[8 * 8]` may hold a `*` (`(&a)[8]`-style declarators are not supported anyway)
            if body.split('[').next().unwrap_or(body).contains(['*', '&']) {
                continue;
            }
            if body.contains('=') {
                return Err(self.err(
                    p,
                    "threadgroup variables cannot have an initialiser (MSL rejects it)",
                ));
            }
            if body.contains(',') && !body.contains('<') {
                return Err(self.err(p, "declare one threadgroup variable per statement"));
            }
            // `alignas(N)` is the only parenthesised part we accept
            let (body, align) = match body.find("alignas") {
                Some(k) => {
                    let open = body[k..].find('(').map(|o| k + o);
                    let close = open.and_then(|o| body[o..].find(')').map(|c| o + c));
                    let (Some(o), Some(c)) = (open, close) else {
                        return Err(self.err(p, "cannot parse alignas in threadgroup declaration"));
                    };
                    (
                        format!("{}{}", &body[..k], &body[c + 1..]),
                        Some(body[o + 1..c].trim().to_string()),
                    )
                }
                None => (body.to_string(), None),
            };
            if body.contains('(') {
                return Err(self.err(p, "unsupported threadgroup declaration (only `threadgroup [alignas(N)] T name[dims];`)"));
            }
            let (ty, name, dims) = split_decl(&body)
                .ok_or_else(|| self.err(p, "cannot parse threadgroup declaration"))?;
            let align = match align {
                Some(a) => format!("(({a}) > alignof({ty}) ? ({a}) : alignof({ty}))"),
                None => format!("alignof({ty})"),
            };
            let text = format!(
                "threadgroup {ty} (&{name}){dims} = *(threadgroup {ty} (*){dims})::msl::detail::tg_static({slot}, sizeof({ty}{dims}), {align}, \"{name}\");"
            );
            slot += 1;
            decls.push((p, semi + 1, text, format!("sizeof({ty}{dims})")));
        }
        // One static_assert per kernel, after its last array, on the sum of
        // its arrays (sizes may depend on template parameters, so only the
        // compiler can add them up); arrays outside a kernel body are checked
        // one by one. Appended to the last declaration's line: no new lines.
        let body_of = |p: usize| self.bodies.iter().position(|b| b.0 < p && p < b.1);
        let mut edits = Vec::new();
        for (i, (p, end, text, size)) in decls.iter().enumerate() {
            let body = body_of(*p);
            let last = body.is_none() || decls[i + 1..].iter().all(|d| body_of(d.0) != body);
            let mut text = text.clone();
            if last {
                let (sizes, who): (Vec<&str>, String) = match body {
                    Some(b) => (
                        decls
                            .iter()
                            .filter(|d| body_of(d.0) == Some(b))
                            .map(|d| d.3.as_str())
                            .collect(),
                        format!("kernel `{}`", self.bodies[b].2),
                    ),
                    None => (vec![size.as_str()], "this declaration".into()),
                };
                text.push_str(&format!(
                    " static_assert({} <= 32768, \"{}: {who} declares more than 32 KiB of threadgroup memory (the Apple GPU limit)\");",
                    sizes.join(" + "),
                    TG_ASSERT_MARKER
                ));
            }
            edits.push((*p, *end, text));
        }
        for (p, end, text) in edits {
            self.replace(p, end, &text);
        }
        Ok(())
    }
}

fn host_name(attr: &str) -> Option<String> {
    let rest = attr
        .strip_prefix("host_name")?
        .trim_start()
        .strip_prefix('(')?;
    let q1 = rest.find('"')?;
    let q2 = rest[q1 + 1..].find('"')? + q1 + 1;
    Some(rest[q1 + 1..q2].to_string())
}

fn call_arg(attr: &str, f: &str) -> Option<String> {
    let rest = attr.strip_prefix(f)?.trim_start().strip_prefix('(')?;
    let inner = rest.strip_suffix(')')?.trim();
    (!inner.is_empty()).then(|| inner.to_string())
}

/// Identifier ending right before `pos` (skipping whitespace): (start, end).
fn ident_before(m: &[u8], pos: usize) -> Option<(usize, usize)> {
    let mut e = pos;
    while e > 0 && m[e - 1].is_ascii_whitespace() {
        e -= 1;
    }
    let mut s = e;
    while s > 0 && is_ident(m[s - 1]) {
        s -= 1;
    }
    (s < e).then_some((s, e))
}

/// `" float4 buf[2][64] "` -> ("float4", "buf", "[2][64]").
fn split_decl(body: &str) -> Option<(String, String, String)> {
    let b = body.trim();
    let (head, dims) = match b.find('[') {
        Some(k) => (&b[..k], &b[k..]),
        None => (b, ""),
    };
    let head = head.trim_end();
    let ns = head.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))? + 1;
    let (ty, name) = (head[..ns].trim(), &head[ns..]);
    if ty.is_empty() || name.is_empty() {
        return None;
    }
    Some((ty.to_string(), name.to_string(), dims.trim().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_attributes_and_registers() {
        let src = "kernel void add(device float* x [[buffer(0)]],\n constant P& p [[buffer(1)]],\n uint3 gid [[thread_position_in_grid]]) {\n  threadgroup float buf[64];\n  threadgroup float* q = buf; // threadgroup float bogus[2];\n  x[gid.x] = (threadgroup float*)q == nullptr;\n}\n";
        let r = rewrite(src, "t.metal").unwrap();
        assert!(
            r.source.contains("device float* x = MSL_BUFFER(0)"),
            "{}",
            r.source
        );
        assert!(r
            .source
            .contains("uint3 gid = MSL_BUILTIN(thread_position_in_grid)"));
        assert!(r.source.contains("tg_static(0, sizeof(float[64])"));
        assert!(
            !r.source.contains("tg_static(1"),
            "pointer variable or comment rewritten: {}",
            r.source
        );
        assert_eq!(
            r.kernels,
            vec![KernelInfo {
                name: "add".into(),
                call: "add".into(),
                line: 1
            }]
        );
        // line count preserved: original lines + #line header + registration
        assert_eq!(
            r.source.lines().position(|l| l.contains("x[gid.x]")),
            Some(6)
        );
    }

    #[test]
    fn template_instantiations() {
        let src = "template <typename T>\nkernel void k(device T* x [[buffer(0)]]) { }\ntemplate [[host_name(\"k_f32\")]] kernel void k<float>(device float* x [[buffer(0)]]);\n";
        let r = rewrite(src, "t.metal").unwrap();
        assert_eq!(r.kernels.len(), 1);
        assert_eq!(r.kernels[0].name, "k_f32");
        assert_eq!(r.kernels[0].call, "k<float>");
        assert!(!r.source.contains("host_name"));
    }

    #[test]
    fn attribute_form_and_typedef_instantiation() {
        let src = "[[kernel]] void a(device float* x [[buffer(0)]]) {}\n\
template <typename T> kernel void b(device T* x [[buffer(0)]], ushort l [[thread_index_in_simdgroup]]) {}\n\
typedef decltype(b<half>) b_t;\n\
template [[host_name(\"b_f16\")]] kernel b_t b<half>;\n";
        let r = rewrite(src, "t.metal").unwrap();
        let names: Vec<_> = r
            .kernels
            .iter()
            .map(|k| (k.name.as_str(), k.call.as_str()))
            .collect();
        assert_eq!(names, [("a", "a"), ("b_f16", "b<half>")]);
        assert!(
            r.source
                .contains("ushort l = MSL_BUILTIN(thread_index_in_simdgroup)"),
            "{}",
            r.source
        );
        assert!(!r.source.contains("[[kernel]]"));
    }

    #[test]
    fn vec_constructor_calls() {
        let src = "kernel void k(device half* x [[buffer(0)]]) { *(device vec<half, 4>*)x = vec<half, 4>(metal::vec<float, 4>(1.0f)); }";
        let r = rewrite(src, "t").unwrap();
        assert!(
            r.source.contains("*(device vec<half, 4>*)x = ::msl::detail::make_vec<half, 4>(::msl::detail::make_vec<float, 4>(1.0f))"),
            "{}",
            r.source
        );
    }

    #[test]
    fn never_panics_on_truncated_or_odd_input() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kernels");
        let mut sources: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "metal"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap())
            .collect();
        sources
            .push("kernel void é(device float* x [[buffer(0)]]) { /* ü */ x[0] = 1'0; } [[".into());
        for src in &sources {
            let cuts: Vec<usize> = (0..src.len())
                .step_by(13)
                .filter(|&i| src.is_char_boundary(i))
                .collect();
            for i in cuts {
                let _ = rewrite(&src[..i], "t.metal");
                let _ = rewrite(&src[i..], "t.metal");
            }
        }
    }

    #[test]
    fn threadgroup_declarations() {
        let src = "kernel void k(device float* x [[buffer(0)]]) {\n  threadgroup alignas(16) float a[8];\n  threadgroup vec<float, 4> b[2];\n  threadgroup float* p = a;\n}";
        let r = rewrite(src, "t").unwrap();
        let squashed: String = r.source.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(squashed.contains("threadgroup float (&a)[8] = *(threadgroup float (*)[8])::msl::detail::tg_static(0, sizeof(float[8]), ((16) > alignof(float) ? (16) : alignof(float)), \"a\");"), "{squashed}");
        assert!(
            r.source.contains("tg_static(1, sizeof(vec<float, 4>[2])"),
            "{}",
            r.source
        );
        assert!(r.source.contains("threadgroup float* p = a;"));
        // a product in the bound (a macro such as `ROWS * COLS` after preprocessing)
        let r = rewrite(
            "kernel void k(device float* x [[buffer(0)]]) {\n  threadgroup float t[8 * 4];\n}",
            "t",
        )
        .unwrap();
        assert!(
            r.source.contains("tg_static(0, sizeof(float[8 * 4])"),
            "{}",
            r.source
        );
        for bad in [
            "threadgroup float z = 0;",
            "threadgroup float y[2], w[2];",
            "threadgroup __attribute__((aligned(4))) float v[2];",
        ] {
            let src = format!("kernel void k(device float* x [[buffer(0)]]) {{ {bad} }}");
            assert!(rewrite(&src, "t").is_err(), "{bad}");
        }
    }

    #[test]
    fn half_literals() {
        let r = rewrite(
            "kernel void k(device half* x [[buffer(0)]]) { x[0] = 1.5h + 2h * x[1e2]; }",
            "t",
        )
        .unwrap();
        assert!(
            r.source.contains("((half)1.5f) + ((half)2.0f) * x[1e2]"),
            "{}",
            r.source
        );
    }

    #[test]
    fn missing_attribute_is_an_error() {
        let e = rewrite("kernel void k(device float* x) {}", "t.metal").unwrap_err();
        assert!(e.message.contains("no attribute"), "{e}");
        assert_eq!((e.file.as_str(), e.line), ("t.metal", 1));
        // lines follow preprocessor markers
        let src = "# 1 \"a.metal\"\n\n# 7 \"b.metal\"\nint x;\nkernel void k(float* x) {}";
        let e = rewrite(src, "t").unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("b.metal", 8));
    }
}
