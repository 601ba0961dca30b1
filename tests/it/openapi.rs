//! The OpenAPI document against the real router. The document is derived from the
//! router (each handler is routed by its `#[utoipa::path]` through utoipa-axum's
//! `routes!`), so every served API route is documented by construction; these tests
//! check the document's shape and that every documented operation is served with the
//! documented security.

use crate::common::TestApp;
use serde_json::Value;

/// The operations the API had when the document began to be derived from the router.
const OPERATIONS: usize = 45;

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
    // The router is the document (utoipa-axum `routes!`): no route can be served
    // undocumented, so only the size is pinned here, against a route lost on the way.
    assert!(ops.len() >= OPERATIONS, "{} operations", ops.len());
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
