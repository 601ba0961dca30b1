//! The layering rules of docs/ARCHITECTURE.md, checked on the source text (issue #17):
//!
//! ```text
//! edge      HTTP handlers, SSE, OpenAPI, AppState, CLI, ops, error-to-HTTP mapping
//! services  auth, billing, account (the flows; no axum, no AppState, no rusqlite)
//! jobs      the queue, worker and kinds (nothing from auth, billing or the edge)
//! storage   SQL and the writer (nothing above it)
//! base      config, clock, ids, identity, cache, secrets, logging, ratelimit
//! ```
//!
//! A file may name (`crate::...`) only its own layer or lower ones; service and jobs files
//! do not touch axum, `AppState` or rusqlite; route files do not call storage. Comments and
//! `#[cfg(test)]` modules are not checked: tests may reach anywhere.

use std::path::{Path, PathBuf};

/// Files of a service or jobs directory that are HTTP edge: handlers, extractors, SSE.
const EDGE_FILES: &[&str] = &[
    "auth/routes.rs",
    "auth/extract.rs",
    "billing/routes.rs",
    "billing/fake_pages.rs",
    "jobs/routes.rs",
];

/// Violations that remain while issue #17 is under way: a ratchet. The test fails on any
/// violation not listed here, and on a listed one that is gone (delete its line), so the
/// list only shrinks.
const KNOWN: &[&str] = &[
    "auth/routes.rs (a route file) calls storage",
    "billing/routes.rs (a route file) calls storage",
    "jobs/kinds.rs (Jobs) names crate::state::AppState (Edge)",
    "jobs/kinds.rs (Jobs) uses AppState",
    "jobs/mod.rs (Jobs) names crate::state::AppState (Edge)",
    "jobs/mod.rs (Jobs) uses AppState",
    "jobs/queue.rs (Jobs) names crate::state::AppState (Edge)",
    "jobs/queue.rs (Jobs) uses AppState",
    "jobs/routes.rs (a route file) calls storage",
    "jobs/uploads.rs (Jobs) names crate::state::AppState (Edge)",
    "jobs/uploads.rs (Jobs) uses AppState",
    "jobs/worker.rs (Jobs) names crate::state::AppState (Edge)",
    "jobs/worker.rs (Jobs) uses AppState",
];

/// Route files: they parse, call one service method and render; no storage.
const ROUTE_FILES: &[&str] = &["auth/routes.rs", "billing/routes.rs", "jobs/routes.rs"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Layer {
    Base,
    Storage,
    Jobs,
    Services,
    Edge,
}

/// The layer of a source file, by its path under `src/` (`auth/service.rs`, `jobs/worker/mod.rs`).
fn layer_of_file(rel: &str) -> Layer {
    if EDGE_FILES.contains(&rel) {
        return Layer::Edge;
    }
    let top = rel.split('/').next().unwrap_or(rel).trim_end_matches(".rs");
    match top {
        "config" | "clock" | "ids" | "identity" | "cache" | "secrets" | "logging" | "ratelimit" => {
            Layer::Base
        }
        "storage" => Layer::Storage,
        "jobs" => Layer::Jobs,
        "auth" | "billing" | "account" | "mail" => Layer::Services,
        _ => Layer::Edge,
    }
}

/// The layer of a `crate::a::b` path (its first two segments).
fn layer_of_path(path: &str) -> Layer {
    let mut seg = path.split("::");
    let top = seg.next().unwrap_or("");
    let sub = seg.next().unwrap_or("");
    let as_file = format!("{top}/{sub}.rs");
    if EDGE_FILES.contains(&as_file.as_str()) {
        return Layer::Edge;
    }
    layer_of_file(&format!("{top}.rs"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments, string contents and `#[cfg(test)]` items.
fn code_of(src: &str) -> String {
    // Drop everything from the first `#[cfg(test)]` on: test modules sit at the end.
    let src = src.split("#[cfg(test)]").next().unwrap_or(src);
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            // A string literal: keep the quotes, drop the text (SQL, messages, docs).
            out.push('"');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            out.push('"');
            i += 1;
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A char literal such as '"'.
            out.push_str("' '");
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn has_word(code: &str, word: &str) -> bool {
    code.match_indices(word).any(|(at, _)| {
        let before = code[..at].chars().next_back();
        let after = code[at + word.len()..].chars().next();
        let ident = |c: char| c.is_alphanumeric() || c == '_';
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

/// Every `crate::x::y` path named in the code (`use crate::{a, b}` groups are expanded
/// one level).
fn crate_paths(code: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = group.split('}').next().unwrap_or("");
            for item in inner.split(',') {
                let item = item.trim();
                if !item.is_empty() {
                    paths.push(item.split(['{', ' ']).next().unwrap_or(item).to_string());
                }
            }
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        paths.push(rest[..end].trim_end_matches(':').to_string());
    }
    paths
}

#[test]
fn the_layers_are_respected() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(files.len() > 40, "found only {} source files", files.len());
    let mut problems = Vec::new();
    // Top module → top modules it names, for the circle check (edge files excluded: the
    // edge may name anything below it).
    let mut graph: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for file in files {
        let rel = file
            .strip_prefix(&src)
            .expect("under src")
            .to_string_lossy()
            .replace('\\', "/");
        if rel.ends_with("tests.rs") {
            continue; // a test module in a file of its own
        }
        let text = std::fs::read_to_string(&file).expect("readable source");
        let code = code_of(&text);
        let mine = layer_of_file(&rel);
        let my_top = rel
            .split('/')
            .next()
            .unwrap_or("")
            .trim_end_matches(".rs")
            .to_string();
        for path in crate_paths(&code) {
            let their_top = path.split("::").next().unwrap_or("").to_string();
            if mine != Layer::Edge && their_top != my_top && layer_of_path(&path) != Layer::Edge {
                graph.entry(my_top.clone()).or_default().insert(their_top);
            }
            let theirs = layer_of_path(&path);
            if theirs > mine {
                problems.push(format!("{rel} ({mine:?}) names crate::{path} ({theirs:?})"));
            }
        }
        if matches!(mine, Layer::Jobs | Layer::Services) {
            for word in ["axum", "AppState", "rusqlite"] {
                if has_word(&code, word) {
                    problems.push(format!("{rel} ({mine:?}) uses {word}"));
                }
            }
        }
        if ROUTE_FILES.contains(&rel.as_str())
            && (has_word(&code, "storage") || code.contains(".storage"))
        {
            problems.push(format!("{rel} (a route file) calls storage"));
        }
    }
    if let Some(circle) = find_circle(&graph) {
        problems.push(format!("import circle: {}", circle.join(" -> ")));
    }
    problems.sort();
    problems.dedup();
    let new: Vec<&String> = problems
        .iter()
        .filter(|p| !KNOWN.contains(&p.as_str()))
        .collect();
    let gone: Vec<&&str> = KNOWN
        .iter()
        .filter(|k| !problems.iter().any(|p| p == *k))
        .collect();
    assert!(
        new.is_empty() && gone.is_empty(),
        "layering (see docs/ARCHITECTURE.md, Layers): {} new violations:\n{}\n\n\
         {} listed in KNOWN but gone (delete them there):\n{}",
        new.len(),
        new.iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        gone.len(),
        gone.iter().map(|s| **s).collect::<Vec<_>>().join("\n"),
    );
}

/// A cycle in the module graph, if there is one, as the modules along it.
fn find_circle(
    graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut circle = stack[at..].to_vec();
            circle.push(node.to_string());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = Default::default();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn the_checker_sees_what_it_must() {
    let mut g: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    g.entry("auth".into()).or_default().insert("billing".into());
    g.entry("billing".into())
        .or_default()
        .insert("storage".into());
    assert_eq!(find_circle(&g), None);
    g.entry("billing".into()).or_default().insert("auth".into());
    assert_eq!(
        find_circle(&g),
        Some(vec!["auth".into(), "billing".into(), "auth".into()])
    );
    let code = code_of(
        "// crate::state::AppState in a comment\nuse crate::{storage::Storage, jobs};\n\
         let s = \"crate::http\"; fn f(x: crate::billing::Billing) {}\n#[cfg(test)]\nmod tests { use crate::state; }",
    );
    assert_eq!(
        crate_paths(&code),
        vec!["storage::Storage", "jobs", "billing::Billing"]
    );
    assert_eq!(layer_of_path("jobs::routes"), Layer::Edge);
    assert_eq!(layer_of_path("jobs::queue"), Layer::Jobs);
    assert_eq!(layer_of_file("jobs/worker/mod.rs"), Layer::Jobs);
    assert_eq!(layer_of_file("storage/jobs.rs"), Layer::Storage);
    assert!(has_word("use axum::Router;", "axum"));
    assert!(!has_word("fn axum_bytes()", "axum"));
}
