//! The shape of the code, checked like behaviour: no source file grows past ~500 lines of
//! non-test code without a stated reason, and no module `use`s a sibling that `use`s it back
//! (directly or around a loop). Function length is clippy's `too_many_lines` (clippy.toml).
//!
//! The module graph is read from the sources: every `crate::…`, `super::…` and `self::…` path
//! in non-test code (use trees included) is resolved against the module tree found on disk,
//! and an edge is drawn between the two siblings where the paths part. Test modules
//! (`#[cfg(test)] mod …`) and test-only files are left out.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    missing_docs
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lines of non-test code a source file may hold.
const MAX_LINES: usize = 500;

/// Files allowed over `MAX_LINES`, each with its reason.
const LONG_FILES: &[(&str, &str)] = &[];

/// Crate roots checked: (crate directory, root file relative to it).
const ROOTS: &[(&str, &str)] = &[
    ("proto", "src/lib.rs"),
    ("common", "src/lib.rs"),
    ("attestors", "src/lib.rs"),
    ("agent", "src/lib.rs"),
    ("agent", "src/main.rs"),
    ("server", "src/lib.rs"),
    ("server", "src/main.rs"),
    ("tests", "src/lib.rs"),
    ("tests", "src/bin/continuity-bench/main.rs"),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// One module found on disk: its path from the crate root and the file holding it.
struct Module {
    path: Vec<String>,
    file: PathBuf,
    /// Non-test source as written (for counting lines).
    text: String,
    /// Non-test source with comments and literals blanked (for analysis).
    code: String,
}

/// Blanks comments and the contents of string and char literals with spaces, keeping every
/// byte offset and newline, so structure can be found without being fooled by text.
fn blank_text(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = src[i..].find('\n').map_or(b.len(), |e| i + e);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = src[i + 2..].find("*/").map_or(b.len(), |e| i + 2 + e + 2);
                blank(&mut out, i, end);
                i = end;
            }
            b'r' if (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = b[i + 1..].iter().take_while(|c| **c == b'#').count();
                let open = i + 1 + hashes;
                if b.get(open) != Some(&b'"') {
                    i += 1;
                    continue;
                }
                let close = format!("\"{}", "#".repeat(hashes));
                let end = src[open + 1..]
                    .find(&close)
                    .map_or(b.len(), |e| open + 1 + e);
                blank(&mut out, open + 1, end);
                i = end + close.len();
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                blank(&mut out, i + 1, j);
                i = j + 1;
            }
            b'\'' => {
                // A char literal ('x', '\n', '\u{..}'), not a lifetime ('a).
                let end = if b.get(i + 1) == Some(&b'\\') {
                    src[i + 3..].find('\'').map(|e| i + 3 + e)
                } else if b.get(i + 2) == Some(&b'\'') {
                    Some(i + 2)
                } else {
                    None
                };
                match end {
                    Some(e) => {
                        blank(&mut out, i + 1, e);
                        i = e + 1;
                    }
                    None => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Byte ranges of `#[cfg(test)]` items (inline test modules, test-only functions, `mod
/// tests;` declarations) in blanked source.
fn test_items(clean: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = clean[from..].find("#[cfg(test)]") {
        let at = from + i;
        let after = &clean[at..];
        let semi = after.find(';');
        let brace = after.find('{');
        let len = match (semi, brace) {
            (Some(s), Some(b)) if s < b => s + 1,
            (_, Some(b)) => matching_brace(after, b).map_or(after.len(), |e| e + 1),
            (Some(s), None) => s + 1,
            (None, None) => after.len(),
        };
        out.push((at, at + len));
        from = at + len;
    }
    out
}

/// Byte offset of the brace closing the one at `open`, in blanked source.
fn matching_brace(s: &str, open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s.bytes().enumerate().skip(open) {
        if c == b'{' {
            depth += 1;
        } else if c == b'}' {
            depth -= 1;
            if depth == 0 {
                return Some(i);
            }
        }
    }
    None
}

/// `src` without its test items: (original text for counting, blanked text for analysis).
fn strip_tests(src: &str) -> (String, String) {
    let clean = blank_text(src);
    let (mut text, mut code, mut last) = (String::new(), String::new(), 0);
    for (from, to) in test_items(&clean) {
        text.push_str(&src[last..from]);
        code.push_str(&clean[last..from]);
        last = to;
    }
    text.push_str(&src[last..]);
    code.push_str(&clean[last..]);
    (text, code)
}

/// Non-test `mod name;` declarations in `code`, with a `#[path = "…"]` if one precedes it.
fn child_decls(code: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut path_attr: Option<String> = None;
    for line in code.lines() {
        let t = line.trim();
        if let Some(p) = t.strip_prefix("#[path = \"") {
            path_attr = p.split('"').next().map(str::to_string);
            continue;
        }
        let decl = t
            .strip_prefix("pub mod ")
            .or_else(|| t.strip_prefix("pub(crate) mod "))
            .or_else(|| t.strip_prefix("pub(super) mod "))
            .or_else(|| t.strip_prefix("mod "));
        if let Some(d) = decl
            && let Some(name) = d.strip_suffix(';')
        {
            out.push((name.trim().to_string(), path_attr.take()));
            continue;
        }
        if !t.starts_with("#[") {
            path_attr = None;
        }
    }
    out
}

/// Loads the module tree under a crate root.
fn load(root_file: &Path) -> Vec<Module> {
    let mut out = Vec::new();
    let mut todo = vec![(Vec::<String>::new(), root_file.to_path_buf(), true)];
    while let Some((path, file, owns_dir)) = todo.pop() {
        let src = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let (text, code) = strip_tests(&src);
        let dir = if owns_dir {
            file.parent().unwrap().to_path_buf()
        } else {
            file.with_extension("")
        };
        for (name, attr) in child_decls(&text) {
            let (child, child_owns) = match attr {
                Some(p) => (file.parent().unwrap().join(p), false),
                None => {
                    let flat = dir.join(format!("{name}.rs"));
                    if flat.exists() {
                        (flat, false)
                    } else {
                        (dir.join(&name).join("mod.rs"), true)
                    }
                }
            };
            let mut p = path.clone();
            p.push(name);
            todo.push((p, child, child_owns));
        }
        out.push(Module {
            path,
            file,
            text,
            code,
        });
    }
    out
}

/// Every module path a source refers to through `crate::`, `super::` or `self::`, resolved
/// to an absolute path from the crate root (the last segments may name items).
fn references(module: &Module, is_dir_module: bool) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let code = &module.code;
    // `use` trees first: expand braces into full paths.
    let mut rest = code.as_str();
    while let Some(at) = find_word(rest, "use ") {
        let after = &rest[at + 4..];
        let end = after.find(';').unwrap_or(after.len());
        for p in expand_use(&after[..end]) {
            out.extend(resolve(&p, &module.path, is_dir_module));
        }
        rest = &after[end..];
    }
    // Then inline paths (`crate::a::b::f()`), outside `use` statements too.
    for prefix in ["crate::", "super::", "self::"] {
        let mut rest = code.as_str();
        while let Some(at) = rest.find(prefix) {
            let ok_start = at == 0 || {
                let c = rest.as_bytes()[at - 1];
                !(c.is_ascii_alphanumeric() || c == b'_' || c == b':')
            };
            let tail: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if ok_start {
                let segs: Vec<String> = tail
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                out.extend(resolve(&segs, &module.path, is_dir_module));
            }
            rest = &rest[at + prefix.len()..];
        }
    }
    out
}

/// Position of `word` at a word boundary in `s`.
fn find_word(s: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find(word) {
        let at = from + i;
        let before_ok = at == 0 || {
            let c = s.as_bytes()[at - 1];
            !(c.is_ascii_alphanumeric() || c == b'_')
        };
        if before_ok {
            return Some(at);
        }
        from = at + word.len();
    }
    None
}

/// Expands a use tree (`crate::{a::B, c::{d, e}}`) into its paths' segments.
fn expand_use(tree: &str) -> Vec<Vec<String>> {
    // Drop `as name` renames, then whitespace.
    let mut words = Vec::new();
    let mut it = tree.split_whitespace();
    while let Some(w) = it.next() {
        if w == "as" {
            let renamed = it.next().unwrap_or("");
            words.push(renamed.trim_start_matches(|c: char| c.is_alphanumeric() || c == '_'));
        } else {
            words.push(w);
        }
    }
    let tree = words.concat();
    let mut out = Vec::new();
    expand_into(&tree, &[], &mut out);
    out
}

fn expand_into(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    for part in split_top(tree) {
        if let Some(open) = part.find('{') {
            let head = part[..open].trim_end_matches("::");
            let inner = &part[open + 1..part.rfind('}').unwrap_or(part.len())];
            let mut p = prefix.to_vec();
            p.extend(segments(head));
            expand_into(inner, &p, out);
        } else {
            let mut p = prefix.to_vec();
            p.extend(segments(part));
            out.push(p);
        }
    }
}

fn segments(path: &str) -> Vec<String> {
    path.split("::")
        .filter(|s| !s.is_empty() && *s != "*")
        .map(str::to_string)
        .collect()
}

/// Splits at commas not inside braces.
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

/// Resolves a path's leading `crate`/`super`/`self` against the current module.
fn resolve(segs: &[String], here: &[String], _is_dir_module: bool) -> Option<Vec<String>> {
    let first = segs.first()?;
    let mut base: Vec<String> = match first.as_str() {
        "crate" => Vec::new(),
        "self" => here.to_vec(),
        "super" => {
            let mut b = here.to_vec();
            b.pop()?;
            b
        }
        _ => return None,
    };
    let mut rest = &segs[1..];
    while rest.first().is_some_and(|s| s == "super") {
        base.pop()?;
        rest = &rest[1..];
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// Sibling-level edges: for a reference from `here` to `to`, the two children of their
/// common parent where the paths part, if both are modules.
fn edge(
    here: &[String],
    to: &[String],
    modules: &BTreeSet<Vec<String>>,
) -> Option<(Vec<String>, String, String)> {
    let common = here.iter().zip(to).take_while(|(a, b)| a == b).count();
    if common >= here.len() || common >= to.len() {
        return None;
    }
    let parent = here[..common].to_vec();
    let target = &to[..=common];
    if !modules.contains(target) {
        return None;
    }
    Some((parent, here[common].clone(), to[common].clone()))
}

/// Cycles in a directed graph (one per strongly connected component with more than one node).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let nodes: Vec<&String> = graph
        .keys()
        .chain(graph.values().flatten())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.clone()];
        while let Some(n) = todo.pop() {
            for m in graph.get(&n).into_iter().flatten() {
                if seen.insert(m.clone()) {
                    todo.push(m.clone());
                }
            }
        }
        seen
    };
    let reaches: BTreeMap<&String, BTreeSet<String>> =
        nodes.iter().map(|n| (*n, reach(n))).collect();
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for n in &nodes {
        if done.contains(*n) || !reaches[n].contains(*n) {
            continue;
        }
        let scc: Vec<String> = nodes
            .iter()
            .filter(|m| reaches[n].contains(**m) && reaches[*m].contains(*n))
            .map(|m| (*m).clone())
            .collect();
        done.extend(scc.iter().cloned());
        out.push(scc);
    }
    out
}

fn is_test_file(file: &Path) -> bool {
    let name = file.file_name().unwrap().to_string_lossy();
    name == "tests.rs" || name.ends_with("_tests.rs")
}

#[test]
fn no_source_file_is_over_the_line_limit_without_a_reason() {
    let ws = workspace();
    let mut long = Vec::new();
    let mut seen = BTreeSet::new();
    for (dir, root) in ROOTS {
        for m in load(&ws.join(dir).join(root)) {
            if is_test_file(&m.file) || !seen.insert(m.file.clone()) {
                continue;
            }
            let lines = m.text.lines().filter(|l| !l.trim().is_empty()).count();
            let rel = m
                .file
                .strip_prefix(&ws)
                .unwrap()
                .to_string_lossy()
                .to_string();
            if lines > MAX_LINES && !LONG_FILES.iter().any(|(f, _)| *f == rel) {
                long.push(format!("{rel}: {lines} non-blank non-test lines"));
            }
        }
    }
    assert!(
        long.is_empty(),
        "files over {MAX_LINES} lines (split them, or list them in LONG_FILES with a reason):\n{}",
        long.join("\n")
    );
}

#[test]
fn no_module_imports_a_sibling_that_imports_it_back() {
    let ws = workspace();
    let mut found = Vec::new();
    for (dir, root) in ROOTS {
        let modules = load(&ws.join(dir).join(root));
        let known: BTreeSet<Vec<String>> = modules.iter().map(|m| m.path.clone()).collect();
        let mut graphs: BTreeMap<Vec<String>, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
        for m in &modules {
            let dir_module = m.file.file_name().is_some_and(|n| n == "mod.rs");
            for to in references(m, dir_module) {
                if let Some((parent, from, target)) = edge(&m.path, &to, &known) {
                    graphs
                        .entry(parent)
                        .or_default()
                        .entry(from)
                        .or_default()
                        .insert(target);
                }
            }
        }
        for (parent, graph) in &graphs {
            for cycle in cycles(graph) {
                let at = if parent.is_empty() {
                    String::from("crate")
                } else {
                    parent.join("::")
                };
                let edges: Vec<String> = cycle
                    .iter()
                    .flat_map(|a| {
                        graph[a]
                            .iter()
                            .filter(|b| cycle.contains(b))
                            .map(move |b| format!("{a} → {b}"))
                    })
                    .collect();
                found.push(format!(
                    "{dir}/{root}: in {at}: {} (edges: {})",
                    cycle.join(" ↔ "),
                    edges.join(", ")
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "module import cycles:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checker_sees_a_cycle_and_a_test_module() {
    // A self-check, so the two tests above cannot pass by seeing nothing.
    let src = "use crate::b::X;\n#[cfg(test)]\nmod tests {\n    use crate::c::Y;\n}\n";
    let (text, code) = strip_tests(src);
    let m = Module {
        path: vec!["a".into()],
        file: PathBuf::from("a.rs"),
        text,
        code,
    };
    assert_eq!(m.text.lines().count(), 2);
    let refs = references(&m, false);
    assert!(refs.contains(&vec!["b".to_string(), "X".to_string()]));
    assert!(!refs.iter().any(|r| r.first().is_some_and(|s| s == "c")));
    let mut g = BTreeMap::new();
    g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    g.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    g.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(
        cycles(&g),
        vec![vec!["a".to_string(), "b".into(), "c".into()]]
    );
    let nested = expand_use("super::{x::{Y, Z as Q}, w as base64}");
    assert_eq!(nested.len(), 3);
    assert!(nested.contains(&vec!["super".to_string(), "x".into(), "Z".into()]));
    assert!(nested.contains(&vec!["super".to_string(), "w".into()]));
}
