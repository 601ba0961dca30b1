//! The OpenAPI document against the real router: every documented operation is served,
//! and every served API route is documented, so a route added without its
//! `#[utoipa::path]` (or an annotation with a wrong path or method) fails here.

use std::collections::BTreeSet;
use std::path::Path;

use crate::common::TestApp;
use serde_json::Value;

/// Every (method, path) the router serves under `/api` plus the ops endpoints. The fake
/// Stripe pages (`/fake-stripe/...`) and the web UI are not part of the API.
/// `served_list_matches_the_code` keeps this list equal to the `.route(...)` calls in src/.
const SERVED: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/me"),
    ("POST", "/api/v1/auth/register"),
    ("POST", "/api/v1/auth/login"),
    ("POST", "/api/v1/auth/refresh"),
    ("POST", "/api/v1/auth/logout"),
    ("POST", "/api/v1/auth/logout-all"),
    ("POST", "/api/v1/auth/password"),
    ("POST", "/api/v1/auth/password-reset/request"),
    ("POST", "/api/v1/auth/password-reset"),
    ("POST", "/api/v1/auth/verify-email/request"),
    ("POST", "/api/v1/auth/verify-email"),
    ("GET", "/api/v1/auth/sessions"),
    ("DELETE", "/api/v1/auth/sessions/{id}"),
    ("GET", "/api/v1/admin/users"),
    ("POST", "/api/v1/admin/claim"),
    ("GET", "/api/v1/billing/plans"),
    ("POST", "/api/v1/billing/checkout"),
    ("POST", "/api/v1/billing/portal"),
    ("GET", "/api/v1/billing/subscription"),
    ("POST", "/api/v1/billing/webhook"),
    ("GET", "/api/v1/admin/billing/events"),
    ("POST", "/api/v1/admin/billing/events/{id}/replay"),
    ("POST", "/api/v1/jobs"),
    ("GET", "/api/v1/jobs"),
    ("GET", "/api/v1/jobs/{id}"),
    ("GET", "/api/v1/jobs/{id}/attempts"),
    ("POST", "/api/v1/jobs/{id}/cancel"),
    ("POST", "/api/v1/jobs/{id}/retry"),
    ("GET", "/api/v1/jobs/{id}/events"),
    ("GET", "/api/v1/events"),
    ("POST", "/api/v1/events/ticket"),
    ("GET", "/api/v1/admin/jobs/dead"),
    ("DELETE", "/api/v1/admin/jobs/{id}"),
    ("POST", "/api/v1/uploads"),
    ("DELETE", "/api/v1/uploads/{id}"),
    ("GET", "/api/v1/auth/providers"),
    ("GET", "/api/v1/auth/oauth/{provider}/authorize"),
    ("POST", "/api/v1/auth/oauth/{provider}/link"),
    ("GET", "/api/v1/auth/oauth/{provider}/callback"),
    ("POST", "/api/v1/auth/oauth/exchange"),
    ("DELETE", "/api/v1/auth/identities/{provider}"),
];

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

async fn fetch_doc(app: &TestApp) -> Value {
    let resp = app.get("/api/v1/openapi.json", None).await;
    assert_eq!(resp.status(), 200);
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("application/json"), "content type {ct}");
    resp.json().await.expect("the document is JSON")
}

/// (METHOD, path, operation) of every documented operation.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for m in METHODS {
            if let Some(op) = item.get(m) {
                out.push((m.to_uppercase(), path.clone(), op.clone()));
            }
        }
    }
    out
}

fn pair(m: &str, p: &str) -> (String, String) {
    (m.to_string(), p.to_string())
}

/// Fills `{param}` segments with a value no route treats specially.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if seg.starts_with('{') && seg.ends_with('}') {
                "0doc0dummy0"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// True when the operation can be called without credentials.
fn is_public(op: &Value) -> bool {
    match op.get("security").and_then(Value::as_array) {
        None => true,
        Some(reqs) => reqs
            .iter()
            .any(|r| r.as_object().is_some_and(|o| o.is_empty())),
    }
}

async fn call(app: &TestApp, method: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = app.client.request(method, app.url(&concrete(path)));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let is_stream = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if is_stream {
        // An SSE stream never ends on its own; the status is all we need.
        return (status, Value::Null);
    }
    let body = resp.bytes().await.expect("body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

fn is_unrouted(status: u16, body: &Value) -> bool {
    status == 405
        || (status == 404
            && body["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("no API route")))
}

#[tokio::test]
async fn document_is_openapi_3_1_with_bearer_auth_and_problem_errors() {
    let app = TestApp::start().await;
    let doc = fetch_doc(&app).await;
    let version = doc["openapi"].as_str().unwrap_or("");
    assert!(version.starts_with("3.1"), "openapi version {version:?}");
    assert_eq!(doc["servers"][0]["url"], "/");
    let bearer = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(bearer["type"], "http");
    assert_eq!(bearer["scheme"], "bearer");
    for name in [
        "Problem",
        "SignedIn",
        "TokenPair",
        "User",
        "Entitlement",
        "Job",
        "Plan",
    ] {
        assert!(
            doc["components"]["schemas"].get(name).is_some(),
            "schema {name} is in the components"
        );
    }
    let ops = operations(&doc);
    assert!(ops.len() >= SERVED.len(), "{} operations", ops.len());
    for (m, p, op) in &ops {
        let responses = op["responses"].as_object().expect("responses");
        assert!(!responses.is_empty(), "{m} {p} documents no response");
        assert!(
            responses
                .keys()
                .any(|s| s.starts_with('2') || s.starts_with('3')),
            "{m} {p} documents no success response"
        );
        for (status, resp) in responses {
            if status.starts_with('4') || status.starts_with('5') {
                assert_eq!(
                    resp["content"]["application/problem+json"]["schema"]["$ref"],
                    "#/components/schemas/Problem",
                    "{m} {p} {status} is a problem document"
                );
            }
        }
        if !is_public(op) {
            assert!(
                responses.contains_key("401"),
                "{m} {p} needs auth but documents no 401"
            );
        }
    }
    // The SSE endpoints are documented as event streams.
    for p in ["/api/v1/events", "/api/v1/jobs/{id}/events"] {
        assert!(
            doc["paths"][p]["get"]["responses"]["200"]["content"]
                .get("text/event-stream")
                .is_some(),
            "{p} is text/event-stream"
        );
    }
    app.shutdown().await;
}

/// Every documented operation reaches a handler (not the "no API route" 404, not 405),
/// and the documented security matches: operations that need auth answer 401 without it.
#[tokio::test]
async fn every_documented_operation_is_served_as_documented() {
    let app = TestApp::start().await;
    // An admin, so admin routes get past their role check too.
    let admin = app.admin("openapi-admin@example.com").await;
    assert!(admin.is_admin);
    let doc = fetch_doc(&app).await;
    let mut failures = Vec::new();
    for (i, (m, p, op)) in operations(&doc).into_iter().enumerate() {
        // A fresh session per call: logout and password changes revoke the caller's tokens.
        let user = app.create_user(&format!("openapi-{i}@example.com")).await;
        let token = if p.contains("/admin/") {
            &admin.access_token
        } else {
            &user.access_token
        };
        let (status, body) = call(&app, &m, &p, Some(token)).await;
        let unrouted = is_unrouted(status, &body);
        if unrouted {
            failures.push(format!(
                "{m} {p} is documented but not served ({status} {body})"
            ));
            continue;
        }
        let (anon_status, anon_body) = call(&app, &m, &p, None).await;
        if is_public(&op) && anon_status == 401 {
            failures.push(format!(
                "{m} {p} is documented without security but answers 401 without a token: {anon_body}"
            ));
        }
        if !is_public(&op) && anon_status != 401 {
            failures.push(format!(
                "{m} {p} is documented with security but answers {anon_status} without a token"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    app.shutdown().await;
}

/// Every route the router serves is documented, and the document has nothing else.
#[tokio::test]
async fn every_served_route_is_documented() {
    let app = TestApp::start().await;
    let doc = fetch_doc(&app).await;
    let documented: BTreeSet<_> = operations(&doc)
        .into_iter()
        .map(|(m, p, _)| (m, p))
        .collect();
    let served: BTreeSet<_> = SERVED.iter().map(|(m, p)| pair(m, p)).collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in the OpenAPI document (add #[utoipa::path] to the handler and \
         list it in src/openapi.rs): {undocumented:?}"
    );
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        extra.is_empty(),
        "documented but not in SERVED of tests/it/openapi.rs: {extra:?}"
    );
    app.shutdown().await;
}

/// `SERVED` is the list of `.route(...)` calls in src/ (minus the fake Stripe pages), so
/// a new route cannot be missed by forgetting to list it.
#[test]
fn served_list_matches_the_code() {
    let mut in_code = BTreeSet::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for file in rust_files(&src) {
        let text = std::fs::read_to_string(&file).expect("read source");
        // Unit tests start fake providers with routes of their own.
        let is_test_file = file.to_string_lossy().ends_with("tests.rs");
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap_or("");
        if is_test_file {
            continue;
        }
        for (method, path) in route_calls(code) {
            if !path.starts_with("/fake-stripe/") {
                in_code.insert((method, path));
            }
        }
    }
    let listed: BTreeSet<_> = SERVED.iter().map(|(m, p)| pair(m, p)).collect();
    let missing: Vec<_> = in_code.difference(&listed).collect();
    let stale: Vec<_> = listed.difference(&in_code).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "SERVED in tests/it/openapi.rs is out of date; routed in src/ but not listed: \
         {missing:?}; listed but not routed: {stale:?}"
    );
}

fn rust_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// `(METHOD, path)` of each `.route("path", get(..).post(..))` call in `text`.
fn route_calls(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let args = rest.trim_start();
        let Some(lit) = args.strip_prefix('"') else {
            continue;
        };
        let Some(end) = lit.find('"') else { break };
        let path = &lit[..end];
        // The method router: up to the parenthesis closing `.route(`.
        let mut depth = 1;
        let mut close = lit.len();
        for (i, c) in lit[end..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        close = end + i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let methods_text = &lit[end + 1..close];
        for m in METHODS {
            let needle = format!("{m}(");
            let mut from = 0;
            while let Some(i) = methods_text[from..].find(&needle) {
                let at = from + i;
                let before = methods_text[..at].chars().next_back();
                if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    out.push((m.to_uppercase(), path.to_string()));
                }
                from = at + needle.len();
            }
        }
    }
    out
}
