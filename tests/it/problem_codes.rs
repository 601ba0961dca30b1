//! The problem codes as documented and as the web UI knows them, against
//! `warpbase::error::ProblemCode`: every code is in docs/API.md's "Stable codes" with its
//! status, every documented code exists, and every code the UI has a message for (or
//! branches on) is one the server sends. The OAuth callback codes (`/#/auth/error?code=`)
//! are a second, smaller list, checked the same way against `oauth_flow::codes`.

use std::collections::BTreeSet;
use std::path::Path;

use warpbase::auth::oauth_flow::codes;
use warpbase::error::ProblemCode;

/// The codes a failed OAuth callback redirects with. A new constant in `oauth_flow::codes`
/// belongs here too.
const CALLBACK_CODES: &[&str] = &[
    codes::INVALID_STATE,
    codes::ACCOUNT_EXISTS,
    codes::IDENTITY_IN_USE,
    codes::ALREADY_LINKED,
    codes::ACCOUNT_DISABLED,
    codes::PROVIDER_ERROR,
    codes::ACCESS_DENIED,
    codes::INTERNAL,
];

/// Sign-out reasons the UI makes up itself (not server codes); each must be passed to
/// `localSignOut` in api.js, so this list cannot outlive its use.
const UI_SIGN_OUT_REASONS: &[&str] = &["logout_all"];

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn server_codes() -> BTreeSet<&'static str> {
    ProblemCode::ALL.iter().map(|c| c.as_str()).collect()
}

/// The text of the markdown list item that starts with `start`, joined into one line.
fn list_item(doc: &str, start: &str) -> String {
    let mut lines = doc.lines().skip_while(|l| !l.starts_with(start));
    let first = lines
        .next()
        .unwrap_or_else(|| panic!("no line starting with {start:?}"));
    let mut item = first.to_string();
    for l in lines {
        if l.starts_with("- ") || l.starts_with('#') || l.trim().is_empty() {
            break;
        }
        item.push(' ');
        item.push_str(l.trim());
    }
    item
}

/// The documented `(code, statuses)` pairs of the "Stable codes" item. A code is a
/// backticked word followed by its status (`` `not_found` 404 ``), or by ` / ` and another
/// code of the same status (`` `conflict` / `email_taken` 409 ``); other backticked words
/// (config keys, headers) are not codes.
fn documented_codes(item: &str) -> Vec<(String, Vec<u16>)> {
    let mut out = Vec::new();
    let mut group: Vec<String> = Vec::new();
    let mut rest = item;
    while let Some(open) = rest.find('`') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('`') else { break };
        let word = &after[..close];
        rest = &after[close + 1..];
        let next = rest.trim_start();
        if next.starts_with('/') {
            group.push(word.to_string());
            continue;
        }
        let status: String = next
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '/')
            .collect();
        let statuses: Vec<u16> = status.split('/').filter_map(|s| s.parse().ok()).collect();
        if statuses.is_empty() {
            group.clear();
            continue;
        }
        group.push(word.to_string());
        for code in group.drain(..) {
            out.push((code, statuses.clone()));
        }
    }
    out
}

/// The keys of a JS object literal `const NAME = { key: ..., };`.
fn js_table_keys(src: &str, name: &str) -> BTreeSet<String> {
    let start = src
        .find(&format!("const {name} = {{"))
        .unwrap_or_else(|| panic!("no table {name}"));
    let body = &src[start..];
    let end = body.find("\n};").unwrap_or(body.len());
    body[..end]
        .lines()
        .skip(1)
        .filter_map(|l| {
            let l = l.trim();
            let (key, _) = l.split_once(':')?;
            key.chars()
                .all(|c| c.is_ascii_lowercase() || c == '_')
                .then(|| key.to_string())
        })
        .filter(|k| !k.is_empty())
        .collect()
}

/// Every `code === '...'` the UI branches on, over all its scripts.
fn js_compared_codes(dir: &Path, out: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        panic!("reading {}", dir.display());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            js_compared_codes(&path, out);
        } else if path.extension().is_some_and(|e| e == "js") {
            let src = std::fs::read_to_string(&path).unwrap_or_default();
            for (i, _) in src.match_indices("code === '") {
                let tail = &src[i + "code === '".len()..];
                if let Some(end) = tail.find('\'') {
                    out.insert(tail[..end].to_string());
                }
            }
        }
    }
}

#[test]
fn every_code_is_documented_with_its_status_and_every_documented_code_exists() {
    let api = read("docs/API.md");
    let documented = documented_codes(&list_item(&api, "- Stable codes:"));
    assert!(documented.len() > 10, "parsed too few: {documented:?}");
    let doc_set: BTreeSet<&str> = documented.iter().map(|(c, _)| c.as_str()).collect();
    let server = server_codes();
    let undocumented: Vec<_> = server.difference(&doc_set).collect();
    assert!(
        undocumented.is_empty(),
        "codes the server sends but docs/API.md does not list: {undocumented:?}"
    );
    let unknown: Vec<_> = doc_set.difference(&server).collect();
    assert!(
        unknown.is_empty(),
        "codes docs/API.md lists but no ProblemCode has: {unknown:?}"
    );
    for (code, statuses) in &documented {
        let Ok(c) = code.parse::<ProblemCode>() else {
            continue;
        };
        assert!(
            statuses.contains(&c.status().as_u16()),
            "docs/API.md gives {code} as {statuses:?}, the server sends {}",
            c.status().as_u16()
        );
    }
}

#[test]
fn every_code_the_ui_knows_is_one_the_server_sends() {
    let server = server_codes();
    let api_js = read("assets/js/api.js");
    for key in js_table_keys(&api_js, "SIGNED_OUT_MESSAGES") {
        if UI_SIGN_OUT_REASONS.contains(&key.as_str()) {
            continue;
        }
        assert!(
            server.contains(key.as_str()),
            "SIGNED_OUT_MESSAGES in assets/js/api.js has a message for {key:?}, which is no ProblemCode"
        );
    }
    for reason in UI_SIGN_OUT_REASONS {
        assert!(
            api_js.contains(&format!("localSignOut('{reason}')")),
            "{reason} is no longer a sign-out reason of api.js; drop it here"
        );
    }

    let mut compared = BTreeSet::new();
    js_compared_codes(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/js"),
        &mut compared,
    );
    assert!(compared.len() > 3, "parsed too few: {compared:?}");
    let unknown: Vec<_> = compared
        .iter()
        .filter(|c| !server.contains(c.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "the UI branches on codes no ProblemCode has: {unknown:?}"
    );
}

#[test]
fn oauth_callback_codes_agree_with_the_docs_and_the_ui() {
    let ours: BTreeSet<String> = CALLBACK_CODES.iter().map(|c| c.to_string()).collect();

    let auth_js = read("assets/js/views/auth.js");
    let ui = js_table_keys(&auth_js, "OAUTH_ERRORS");
    assert_eq!(
        ui, ours,
        "OAUTH_ERRORS in assets/js/views/auth.js against oauth_flow::codes"
    );

    let api = read("docs/API.md");
    let item = api
        .lines()
        .skip_while(|l| !l.starts_with("OAuth callback error codes"))
        .take_while(|l| !l.trim().is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    // The list is one sentence; the paragraph goes on about other things.
    let item = item.split(". ").next().unwrap_or_default();
    let documented: BTreeSet<String> = item
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|w| w.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .map(str::to_string)
        .collect();
    assert_eq!(
        documented, ours,
        "docs/API.md's OAuth callback error codes against oauth_flow::codes"
    );
}
