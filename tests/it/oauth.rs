//! OAuth sign-in and account linking, black-box: the real App against a fake provider
//! (GitHub-like REST API, and a generic OIDC provider with discovery, JWKS and RS256 ID
//! tokens) served on 127.0.0.1:0. The fake is strict: its token endpoint checks
//! BASE64URL(SHA256(code_verifier)) against the recorded challenge, the client
//! credentials, the redirect URI and single use of codes, so a client that skips PKCE or
//! mixes up verifiers fails here. Redirects are never followed; each hop is read.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{TestApp, expect_problem};
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use reqwest::Url;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use warpbase::AppOptions;
use warpbase::clock::ManualClock;
use warpbase::config::{OAuthProviderConfig, Secret};

const CLIENT_ID: &str = "test-client";
const CLIENT_SECRET: &str = "s3cret-client-value";
/// Where "browsers" reach warpbase; only ever parsed, never fetched.
pub(crate) const PUBLIC_URL: &str = "http://ui.warpbase.test";
pub(crate) const PW: &str = "correct horse battery";

// A test RSA key (`openssl genrsa 2048`, PKCS#8) and its public half as JWK n/e; it signs
// nothing outside tests (the same key as src/auth/oauth_tests.rs).
const RSA_KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCed5YHx2xbh1RP\n\
ZVajKAq9CqFoLGyDTvgsLmEM+JtPhFpFIJP5qg3lLdB/64IAkgznYYfFempPfJZW\n\
QxzoyX9SgK623rgiEbPtFwDmUTo7IJ71KVVzyaXlvg3h5iWxp23mDyx5M8EO5Tqs\n\
jGPapUx2x47kaLx/kQ9tnffyuYVWlyK+9AXszj/tEwPrFgfg3ZFDD6QITJrSryxP\n\
PXzuYWQyGxwdqlpOVrCfgVTPKONjle3xIDRSUVZIFMvAg9xdlVrd5ErDsAMMgoTJ\n\
3n6f/hofIOaQ/3lA1L8UwUE4xDqAUFMDrxafIpEmZYF2Rrk6L+nGaXFN/4In6TCb\n\
kiO5xfbBAgMBAAECggEAH9iTh5OttIUxTdVlQFuzMMN6pXdMBWVw3Vwit9scRzIn\n\
e/3sjv98VGLNJG/9S8UOH8/LW8XaqIe2pLZPEH8x/bALrId8xKf/GzYEwcRwKeLH\n\
3ygD2sWa990maA/64kVuAg5plx/t++LYVEXQaWfPwo0fK8ramt5ZleNpqVdcMwbS\n\
h7/du/OVlo5KUXwJyGVFLMMr8Z0R474+PH4QtOsWOIbdOr2QyUTQ/iIJLA/R30p1\n\
FJssoZCbs8Zkx2X65B3kZxTVP/25NK6WIzqgMmJobxr5OB3J7pAlHrgXDMWsVRCO\n\
D0inrITKTm0iEgBfaeJIVXdmK+I9gYb9wxYKTs+FUwKBgQDMT9JFCFg+TnV4I7P6\n\
mZFO9xvSNnPP2j+Pet+hX+GJVrll/74YFFAlbZehL0F5zbxWgmVM27gVEh3/rXSR\n\
+WOXP/eyw6mKO+4atBgpzJF5G8FywyaQgBrw9cjUex81ATIyIerfSUtapwAWgnj8\n\
z1KfhV5prm/akKyFBGiMLM+L6wKBgQDGjqbNe07qv7DDJo0cNSvnchxpGuHtqPut\n\
w8BkPZhpTTSQJ1WlzEA/i7GPghFXFC1DIaLxZp3RO/zey/PoTHwpCql60Xuldtnj\n\
GJaJSYObgxt+M4sjqSMVi9hFJkgKbdSQtVGYQaVcAfBTu1bUWX5JHzK1YNQndFFb\n\
EdNtm5A5AwKBgGX9Np7FQp+ftN4LHI3tWO8NRbMTAY7xiKcMFFRPM5vGUfhLyM3m\n\
XffBFF8e4tV10R1yLDVIvUSvbZAzOyyfTIq1IOX47EoYDoz/98vt1XSaWV/7cOXT\n\
PR+p4d3HtFVWSoNiEQfzY41WLiIOcWzp5XnCLtYcgLOfYq9n+vR2bgiPAoGAR0Lx\n\
aLQFuci8hv2yDVqj/Df/LFXCmkpYsZ+c0B0vMzPLVqVXXt70fBoFywySbp9GM17C\n\
HUOIBo0yD0BBtLCmqxAxjWvbpaIHRzMO7AzfWBPw7RVQrabJebUsFH1Nw7hxXtJE\n\
i5Gb6G6ls1d8LVBFO7cfuusamWJsxHOcXy1C0MMCgYEAtOlNA2rqm9Akpjfu8U+n\n\
dd1Nn6VTt/7Pk5N7T+Hg8TMV3x3mLg3jKJtSfKgdtwefjo+VBA/rLVg5a1gur9QW\n\
4x7cHj3tA6T/GPRdjyC3hgAFlb0Gk1pUEoS9Jh1rrzennxIDdK4ZsRTp6GXF+VAE\n\
SuQplfu9ZBZZWBgCbUG5to8=\n\
-----END PRIVATE KEY-----\n\
";
const RSA_N: &str = "nneWB8dsW4dUT2VWoygKvQqhaCxsg074LC5hDPibT4RaRSCT-aoN5S3Qf-uCAJIM52GHxXpqT3yWVkMc6Ml_UoCutt64IhGz7RcA5lE6OyCe9SlVc8ml5b4N4eYlsadt5g8seTPBDuU6rIxj2qVMdseO5Gi8f5EPbZ338rmFVpcivvQF7M4_7RMD6xYH4N2RQw-kCEya0q8sTz187mFkMhscHapaTlawn4FUzyjjY5Xt8SA0UlFWSBTLwIPcXZVa3eRKw7ADDIKEyd5-n_4aHyDmkP95QNS_FMFBOMQ6gFBTA68WnyKRJmWBdka5Oi_pxmlxTf-CJ-kwm5IjucX2wQ";

// ---------------------------------------------------------------------------------------
// The fake provider

/// Who the next user to consent at the fake is. Captured per authorization code.
#[derive(Clone, Debug)]
pub(crate) struct Person {
    pub(crate) id: u64,
    pub(crate) login: String,
    /// Primary address and whether the provider verified it; `None`: no email at all.
    pub(crate) email: Option<(String, bool)>,
}

pub(crate) fn person(id: u64, email: &str, verified: bool) -> Person {
    Person {
        id,
        login: format!("user{id}"),
        email: Some((email.to_string(), verified)),
    }
}

struct Grant {
    challenge: String,
    nonce: Option<String>,
    redirect_uri: String,
    openid: bool,
    who: Person,
}

#[derive(Default)]
pub(crate) struct FakeState {
    base: String,
    next: Option<Person>,
    grants: HashMap<String, Grant>,
    tokens: HashMap<String, Person>,
    /// Token requests refused because the verifier did not match the challenge.
    pkce_failures: usize,
    /// Token requests that got an access token.
    pub(crate) issued: usize,
}

type Shared = Arc<Mutex<FakeState>>;

pub(crate) struct Fake {
    pub(crate) base: String,
    state: Shared,
}

impl Fake {
    pub(crate) async fn start() -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let state: Shared = Arc::new(Mutex::new(FakeState {
            base: base.clone(),
            ..FakeState::default()
        }));
        let app = Router::new()
            .route("/authorize", get(fake_authorize))
            .route("/token", post(fake_token))
            .route("/api/user", get(fake_github_user))
            .route("/api/user/emails", get(fake_github_emails))
            .route("/.well-known/openid-configuration", get(fake_discovery))
            .route("/jwks", get(fake_jwks))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Fake { base, state }
    }

    pub(crate) fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.state.lock().expect("fake state"))
    }

    pub(crate) fn github(&self) -> OAuthProviderConfig {
        OAuthProviderConfig {
            client_id: CLIENT_ID.into(),
            client_secret: Secret::new(CLIENT_SECRET),
            auth_url: Some(format!("{}/authorize", self.base)),
            token_url: Some(format!("{}/token", self.base)),
            api_url: Some(format!("{}/api", self.base)),
            ..OAuthProviderConfig::default()
        }
    }

    pub(crate) fn oidc(&self) -> OAuthProviderConfig {
        OAuthProviderConfig {
            client_id: CLIENT_ID.into(),
            client_secret: Secret::new(CLIENT_SECRET),
            name: Some("Fake SSO".into()),
            issuer: Some(self.base.clone()),
            ..OAuthProviderConfig::default()
        }
    }

    /// The user consents at the provider's authorize URL: returns `(code, state)` from the
    /// provider's redirect back to our callback.
    pub(crate) async fn consent(
        &self,
        http: &reqwest::Client,
        authorize_url: &str,
        who: Person,
    ) -> Consent {
        self.with(|s| s.next = Some(who));
        let r = http
            .get(authorize_url)
            .send()
            .await
            .expect("fake authorize");
        assert_eq!(
            r.status(),
            302,
            "the fake accepted the authorization request"
        );
        let to = location(&r);
        let url = Url::parse(&to).expect("callback URL");
        let q: HashMap<String, String> = url.query_pairs().into_owned().collect();
        Consent {
            callback_path: url.path().to_string(),
            code: q["code"].clone(),
            state: q["state"].clone(),
        }
    }
}

pub(crate) struct Consent {
    pub(crate) callback_path: String,
    pub(crate) code: String,
    pub(crate) state: String,
}

async fn fake_authorize(
    State(s): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let p = |k: &str| q.get(k).cloned().unwrap_or_default();
    if p("response_type") != "code"
        || p("client_id") != CLIENT_ID
        || p("code_challenge_method") != "S256"
        || p("code_challenge").len() != 43
        || p("state").is_empty()
    {
        return (StatusCode::BAD_REQUEST, "bad authorization request").into_response();
    }
    let mut st = s.lock().expect("fake state");
    let Some(who) = st.next.take() else {
        return (StatusCode::BAD_REQUEST, "nobody to sign in").into_response();
    };
    let code = format!("{:032x}", rand::random::<u128>());
    st.grants.insert(
        code.clone(),
        Grant {
            challenge: p("code_challenge"),
            nonce: q.get("nonce").cloned(),
            redirect_uri: p("redirect_uri"),
            openid: p("scope").split(' ').any(|s| s == "openid"),
            who,
        },
    );
    let Ok(to) =
        Url::parse_with_params(&p("redirect_uri"), &[("code", code), ("state", p("state"))])
    else {
        return (StatusCode::BAD_REQUEST, "bad redirect_uri").into_response();
    };
    (StatusCode::FOUND, [(header::LOCATION, to.to_string())]).into_response()
}

fn oauth_error(code: &str) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": code }))).into_response()
}

async fn fake_token(
    State(s): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let client_ok = match basic {
        Some(pair) => pair == format!("{CLIENT_ID}:{CLIENT_SECRET}"),
        None => {
            form.get("client_id").map(String::as_str) == Some(CLIENT_ID)
                && form.get("client_secret").map(String::as_str) == Some(CLIENT_SECRET)
        }
    };
    if !client_ok {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let mut st = s.lock().expect("fake state");
    let Some(grant) = form.get("code").and_then(|c| st.grants.remove(c)) else {
        return oauth_error("invalid_grant");
    };
    if form.get("redirect_uri") != Some(&grant.redirect_uri) {
        return oauth_error("invalid_grant");
    }
    // RFC 7636 §4.6.
    let verifier = form.get("code_verifier").cloned().unwrap_or_default();
    if URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) != grant.challenge {
        st.pkce_failures += 1;
        return oauth_error("invalid_grant");
    }
    let access = format!("{:032x}", rand::random::<u128>());
    st.tokens.insert(access.clone(), grant.who.clone());
    st.issued += 1;
    let mut body = json!({"access_token": access, "token_type": "bearer", "expires_in": 3600});
    if grant.openid {
        body["id_token"] = json!(id_token(&st.base, grant.nonce, &grant.who));
    }
    Json(body).into_response()
}

fn id_token(issuer: &str, nonce: Option<String>, who: &Person) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = json!({
        "iss": issuer, "sub": format!("oidc-{}", who.id), "aud": CLIENT_ID,
        "iat": now, "exp": now + 300, "nonce": nonce, "name": who.login,
    });
    if let Some((email, verified)) = &who.email {
        claims["email"] = json!(email);
        claims["email_verified"] = json!(verified);
    }
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some("k1".into());
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(RSA_KEY.as_bytes()).expect("test key");
    jsonwebtoken::encode(&header, &claims, &key).expect("sign")
}

fn bearer_person(s: &Shared, headers: &HeaderMap) -> Option<Person> {
    let token = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?;
    s.lock().expect("fake state").tokens.get(token).cloned()
}

async fn fake_github_user(State(s): State<Shared>, headers: HeaderMap) -> Response {
    match bearer_person(&s, &headers) {
        Some(p) => {
            Json(json!({"id": p.id, "login": p.login, "name": null, "email": null})).into_response()
        }
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

async fn fake_github_emails(State(s): State<Shared>, headers: HeaderMap) -> Response {
    match bearer_person(&s, &headers) {
        Some(p) => {
            let mut list =
                vec![json!({"email": "secondary@example.com", "primary": false, "verified": true})];
            if let Some((email, verified)) = p.email {
                list.push(json!({"email": email, "primary": true, "verified": verified}));
            }
            Json(Value::Array(list)).into_response()
        }
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

async fn fake_discovery(State(s): State<Shared>) -> Json<Value> {
    let base = s.lock().expect("fake state").base.clone();
    Json(json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"),
        "jwks_uri": format!("{base}/jwks"),
    }))
}

async fn fake_jwks() -> Json<Value> {
    Json(
        json!({"keys": [{"kty": "RSA", "kid": "k1", "alg": "RS256", "use": "sig", "n": RSA_N, "e": "AQAB"}]}),
    )
}

// ---------------------------------------------------------------------------------------
// Driving the flow

pub(crate) struct Env {
    pub(crate) app: TestApp,
    pub(crate) fake: Fake,
    /// A plain client for the provider's side (no redirects followed).
    pub(crate) http: reqwest::Client,
    /// The browser-binding cookie (`name=value`) of the one browser the test drives: set
    /// by authorize and link, sent with callbacks and exchanges.
    pub(crate) jar: Mutex<Option<String>>,
}

pub(crate) async fn env() -> Env {
    env_with_clock(None).await
}

pub(crate) async fn env_with_clock(clock: Option<Arc<ManualClock>>) -> Env {
    let fake = Fake::start().await;
    let (github, oidc) = (fake.github(), fake.oidc());
    let opts = AppOptions {
        clock: clock.map(|c| c as warpbase::clock::SharedClock),
        ..AppOptions::default()
    };
    let app = TestApp::start_with(
        move |c| {
            c.public_url = PUBLIC_URL.into();
            c.auth.rate_limit = 1000;
            c.auth.oauth.github = Some(github);
            c.auth.oauth.oidc = Some(oidc);
        },
        opts,
    )
    .await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    Env {
        app,
        fake,
        http,
        jar: Mutex::new(None),
    }
}

/// The `name=value` of the response's `Set-Cookie`, if any.
pub(crate) fn set_cookie(r: &reqwest::Response) -> Option<String> {
    let v = r.headers().get("set-cookie")?.to_str().ok()?;
    Some(v.split(';').next()?.trim().to_string())
}

pub(crate) fn location(r: &reqwest::Response) -> String {
    r.headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("a Location header")
        .to_string()
}

/// Where the callback sent the browser: `Ok(exchange code)` or `Err((error code, detail))`.
pub(crate) fn outcome(location: &str) -> Result<String, (String, String)> {
    let (base, fragment) = location.split_once("/#/").expect("a UI fragment URL");
    assert_eq!(base, PUBLIC_URL, "redirects go to the public URL");
    let (route, query) = fragment.split_once('?').expect("a query in the fragment");
    let q: HashMap<String, String> = url_pairs(query);
    match route {
        "auth/complete" => {
            assert_eq!(q.len(), 1, "only the exchange code travels: {location}");
            Ok(q["code"].clone())
        }
        "auth/error" => Err((
            q["code"].clone(),
            q.get("detail").cloned().unwrap_or_default(),
        )),
        other => panic!("unexpected redirect target {other}"),
    }
}

pub(crate) fn url_pairs(query: &str) -> HashMap<String, String> {
    Url::parse(&format!("http://x/?{query}"))
        .expect("query")
        .query_pairs()
        .into_owned()
        .collect()
}

impl Env {
    /// `GET /authorize` → the provider URL it redirects to.
    pub(crate) async fn authorize(&self, provider: &str) -> String {
        let r = self
            .app
            .get(&format!("/api/v1/auth/oauth/{provider}/authorize"), None)
            .await;
        assert_eq!(r.status(), 302, "authorize redirects");
        assert_eq!(r.headers()["cache-control"], "no-store");
        self.keep_cookie(&r);
        location(&r)
    }

    /// `POST /link` as `token` → the provider URL.
    pub(crate) async fn link_url(&self, provider: &str, token: &str) -> String {
        let mut req = self
            .app
            .client
            .post(self.app.url(&format!("/api/v1/auth/oauth/{provider}/link")))
            .bearer_auth(token)
            .json(&json!({}));
        if let Some(c) = self.cookie() {
            req = req.header("cookie", c);
        }
        let r = req.send().await.expect("link");
        assert_eq!(r.status(), 200, "link starts");
        self.keep_cookie(&r);
        let body: Value = r.json().await.expect("json");
        body["authorize_url"]
            .as_str()
            .expect("authorize_url")
            .to_string()
    }

    pub(crate) fn cookie(&self) -> Option<String> {
        self.jar.lock().expect("jar").clone()
    }

    fn keep_cookie(&self, r: &reqwest::Response) {
        if let Some(c) = set_cookie(r) {
            *self.jar.lock().expect("jar") = Some(c);
        }
    }

    /// Our callback as this test's browser (with its binding cookie).
    async fn callback_raw(&self, path: &str, query: &[(&str, &str)]) -> reqwest::Response {
        self.callback_as(self.cookie().as_deref(), path, query)
            .await
    }

    /// Our callback from a browser with the given cookie (`None`: no cookie at all).
    pub(crate) async fn callback_as(
        &self,
        cookie: Option<&str>,
        path: &str,
        query: &[(&str, &str)],
    ) -> reqwest::Response {
        let url = Url::parse_with_params(&self.app.url(path), query).expect("url");
        let mut req = self.app.client.get(url);
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        req.send().await.expect("callback request")
    }

    /// Our callback for a consent → where it sent the browser.
    pub(crate) async fn callback(&self, c: &Consent) -> Result<String, (String, String)> {
        let r = self
            .callback_raw(&c.callback_path, &[("code", &c.code), ("state", &c.state)])
            .await;
        assert_eq!(r.status(), 302, "the callback always redirects");
        outcome(&location(&r))
    }

    /// authorize → consent → callback.
    pub(crate) async fn sign_in(
        &self,
        provider: &str,
        who: Person,
    ) -> Result<String, (String, String)> {
        let url = self.authorize(provider).await;
        let consent = self.fake.consent(&self.http, &url, who).await;
        self.callback(&consent).await
    }

    pub(crate) async fn exchange(&self, code: &str) -> reqwest::Response {
        self.exchange_as(self.cookie().as_deref(), code).await
    }

    /// The exchange from a browser with the given cookie (`None`: no cookie at all).
    pub(crate) async fn exchange_as(&self, cookie: Option<&str>, code: &str) -> reqwest::Response {
        let mut req = self
            .app
            .client
            .post(self.app.url("/api/v1/auth/oauth/exchange"))
            .json(&json!({ "code": code }));
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        req.send().await.expect("exchange request")
    }

    /// The whole flow up to tokens; panics on a refusal.
    pub(crate) async fn sign_in_ok(&self, provider: &str, who: Person) -> Value {
        let code = self
            .sign_in(provider, who)
            .await
            .unwrap_or_else(|e| panic!("sign-in refused: {e:?}"));
        let r = self.exchange(&code).await;
        assert_eq!(r.status(), 200, "exchange");
        r.json().await.expect("json")
    }

    pub(crate) async fn me(&self, token: &str) -> Value {
        let r = self.app.get("/api/v1/me", Some(token)).await;
        assert_eq!(r.status(), 200, "me");
        r.json().await.expect("json")
    }

    pub(crate) async fn register(&self, email: &str) -> Value {
        let r = self
            .app
            .post_json(
                "/api/v1/auth/register",
                None,
                &json!({"email": email, "password": PW}),
            )
            .await;
        assert_eq!(r.status(), 201, "register");
        r.json().await.expect("json")
    }

    pub(crate) async fn audit_events(&self, user_id: &str) -> Vec<String> {
        let uid = user_id.to_string();
        self.app
            .state()
            .storage
            .read(move |c| warpbase::storage::auth::audit_events(c, &uid, 100))
            .await
            .expect("audit")
            .into_iter()
            .map(|(e, _)| e)
            .collect()
    }

    pub(crate) async fn sql_count(&self, sql: &'static str) -> i64 {
        self.app.db_i64(sql, vec![]).await.expect("count")
    }
}

pub(crate) fn token(v: &Value) -> &str {
    v["access_token"].as_str().expect("access_token")
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn providers_are_listed_and_unknown_ones_are_404() {
    let none = TestApp::start().await;
    let r = none.get("/api/v1/auth/providers", None).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body, json!({"items": []}));
    let r = none.get("/api/v1/auth/oauth/github/authorize", None).await;
    expect_problem(r, 404, "not_found").await;
    none.shutdown().await;

    let env = env().await;
    let body: Value = env
        .app
        .get("/api/v1/auth/providers", None)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(
        body,
        json!({"items": [{"id": "github", "name": "GitHub"}, {"id": "oidc", "name": "Fake SSO"}]})
    );
    for path in [
        "/api/v1/auth/oauth/google/authorize",
        "/api/v1/auth/oauth/nope/authorize",
        "/api/v1/auth/oauth/nope/callback?code=a&state=b",
    ] {
        expect_problem(env.app.get(path, None).await, 404, "not_found").await;
    }
    let r = env
        .app
        .post_json("/api/v1/auth/oauth/github/link", None, &json!({}))
        .await;
    expect_problem(r, 401, "unauthorized").await;
    env.app.shutdown().await;
}

#[tokio::test]
async fn github_sign_in_with_pkce_creates_the_account_and_exchanges_once() {
    let env = env().await;
    let url = env.authorize("github").await;
    let q: HashMap<String, String> = Url::parse(&url)
        .expect("url")
        .query_pairs()
        .into_owned()
        .collect();
    assert!(url.starts_with(&format!("{}/authorize?", env.fake.base)));
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(
        q["redirect_uri"],
        format!("{PUBLIC_URL}/api/v1/auth/oauth/github/callback")
    );
    assert!(q["state"].len() >= 16, "a real state");

    let consent = env
        .fake
        .consent(&env.http, &url, person(4242, "Octo@Example.com", true))
        .await;
    let code = env.callback(&consent).await.expect("signed in");
    assert_eq!(env.fake.with(|s| (s.issued, s.pkce_failures)), (1, 0));
    let stored = env
        .sql_count("SELECT COUNT(*) FROM one_time_tokens WHERE purpose = 'oauth_exchange'")
        .await;
    assert_eq!(stored, 1, "the exchange code is stored (hashed)");

    // The same callback again: the state was single use.
    let replay = env.callback(&consent).await;
    assert_eq!(replay.expect_err("replay refused").0, "invalid_state");

    let r = env.exchange(&code).await;
    assert_eq!(r.status(), 200);
    let signed: Value = r.json().await.expect("json");
    assert_eq!(signed["token_type"], "Bearer");
    assert!(signed["refresh_token"].as_str().is_some());
    assert_eq!(signed["user"]["email"], "octo@example.com");
    assert_eq!(signed["user"]["email_verified"], true);
    assert_eq!(
        signed["user"]["role"], "user",
        "no account is admin for being first"
    );
    assert_eq!(
        signed["user"]["identities"],
        json!([{"provider": "github", "email": "octo@example.com"}])
    );
    let me = env.me(token(&signed)).await;
    assert_eq!(me["id"], signed["user"]["id"]);

    // The exchange code is single use.
    expect_problem(env.exchange(&code).await, 400, "invalid_grant").await;
    expect_problem(env.exchange("made-up").await, 400, "invalid_grant").await;

    // The tokens refresh like any other session.
    let r = env
        .app
        .post_json(
            "/api/v1/auth/refresh",
            None,
            &json!({"refresh_token": signed["refresh_token"]}),
        )
        .await;
    assert_eq!(r.status(), 200, "refresh");

    // Signing in again with the same GitHub account finds the same user.
    let again = env
        .sign_in_ok("github", person(4242, "octo@example.com", true))
        .await;
    assert_eq!(again["user"]["id"], signed["user"]["id"]);
    let uid = signed["user"]["id"].as_str().expect("id");
    let events = env.audit_events(uid).await;
    for e in ["identity_created", "oauth_login", "login"] {
        assert!(events.iter().any(|x| x == e), "audit has {e}: {events:?}");
    }
    env.app.shutdown().await;
}

#[tokio::test]
async fn a_wrong_pkce_verifier_is_refused_by_the_provider() {
    let env = env().await;
    let url = env.authorize("github").await;
    let consent = env
        .fake
        .consent(&env.http, &url, person(1, "a@example.com", true))
        .await;
    // Swap the verifier we stored for this state: the provider must refuse the code.
    let state = consent.state.clone();
    env.app
        .state()
        .storage
        .write(move |c| {
            let n = c.execute(
                "UPDATE oauth_states SET pkce_verifier = ?2 WHERE state = ?1",
                [state.as_str(), &"x".repeat(43)],
            )?;
            assert_eq!(n, 1, "the state row exists");
            Ok::<_, warpbase::storage::StorageError>(())
        })
        .await
        .expect("tamper");
    let (code, detail) = env.callback(&consent).await.expect_err("refused");
    assert_eq!(code, "provider_error");
    assert!(detail.contains("invalid_grant"), "{detail}");
    assert_eq!(env.fake.with(|s| (s.issued, s.pkce_failures)), (0, 1));
    assert_eq!(env.sql_count("SELECT COUNT(*) FROM users").await, 0);
    env.app.shutdown().await;
}

#[tokio::test]
async fn bad_mismatched_expired_and_denied_states() {
    let clock = ManualClock::new();
    let env = env_with_clock(Some(clock.clone())).await;
    let cb = "/api/v1/auth/oauth/github/callback";

    // Unknown or missing state.
    for query in [
        vec![("code", "c"), ("state", "forged")],
        vec![("code", "c")],
    ] {
        let r = env.callback_raw(cb, &query).await;
        assert_eq!(r.status(), 302);
        assert_eq!(
            outcome(&location(&r)).expect_err("refused").0,
            "invalid_state"
        );
    }

    // A state started for github, presented at the oidc callback.
    let url = env.authorize("github").await;
    let consent = env
        .fake
        .consent(&env.http, &url, person(2, "b@example.com", true))
        .await;
    let r = env
        .callback_raw(
            "/api/v1/auth/oauth/oidc/callback",
            &[("code", &consent.code), ("state", &consent.state)],
        )
        .await;
    assert_eq!(
        outcome(&location(&r)).expect_err("refused").0,
        "invalid_state"
    );

    // Expired: ten minutes pass at the provider.
    let url = env.authorize("github").await;
    let consent = env
        .fake
        .consent(&env.http, &url, person(2, "b@example.com", true))
        .await;
    clock.advance(Duration::from_secs(601));
    assert_eq!(
        env.callback(&consent).await.expect_err("expired").0,
        "invalid_state"
    );

    // The user declines at the provider.
    let url = env.authorize("github").await;
    let state = url_pairs(Url::parse(&url).expect("url").query().expect("query"))["state"].clone();
    let r = env
        .callback_raw(cb, &[("error", "access_denied"), ("state", &state)])
        .await;
    assert_eq!(
        outcome(&location(&r)).expect_err("denied").0,
        "access_denied"
    );
    // ... and that state is spent too.
    let r = env
        .callback_raw(cb, &[("code", "c"), ("state", &state)])
        .await;
    assert_eq!(
        outcome(&location(&r)).expect_err("spent").0,
        "invalid_state"
    );

    assert_eq!(env.fake.with(|s| s.issued), 0, "no code was ever redeemed");
    assert_eq!(env.sql_count("SELECT COUNT(*) FROM users").await, 0);
    env.app.shutdown().await;
}

#[tokio::test]
async fn exchange_codes_expire_after_a_minute() {
    let clock = ManualClock::new();
    let env = env_with_clock(Some(clock.clone())).await;
    let code = env
        .sign_in("github", person(7, "late@example.com", true))
        .await
        .expect("signed in");
    clock.advance(Duration::from_secs(61));
    expect_problem(env.exchange(&code).await, 400, "invalid_grant").await;
    env.app.shutdown().await;
}

#[tokio::test]
async fn email_matches_link_automatically_only_when_both_sides_are_verified() {
    let env = env().await;
    // A password account whose email is not verified: never linked by email.
    let reg = env.register("ada@example.com").await;
    let (code, _) = env
        .sign_in("github", person(10, "ada@example.com", true))
        .await
        .expect_err("refused");
    assert_eq!(code, "account_exists");

    // A verified account, but the provider has not verified the address.
    let verified = env.app.create_user("bob@example.com").await;
    let (code, _) = env
        .sign_in("github", person(11, "bob@example.com", false))
        .await
        .expect_err("refused");
    assert_eq!(code, "account_exists");
    let events = env.audit_events(&verified.id).await;
    assert!(events.is_empty(), "nothing linked to bob: {events:?}");

    // Both verified: linked to the existing account, no new user.
    let users_before = env.sql_count("SELECT COUNT(*) FROM users").await;
    let signed = env
        .sign_in_ok("github", person(11, "Bob@example.com", true))
        .await;
    assert_eq!(signed["user"]["id"], verified.id.as_str());
    assert_eq!(
        env.sql_count("SELECT COUNT(*) FROM users").await,
        users_before
    );
    assert!(
        env.audit_events(&verified.id)
            .await
            .contains(&"identity_linked".to_string())
    );

    // Via OIDC (ID token with email_verified) the same rule holds for ada once verified.
    let ada = reg["user"]["id"].as_str().expect("id").to_string();
    let uid = ada.clone();
    env.app
        .state()
        .storage
        .write(move |c| warpbase::storage::auth::set_email_verified(c, &uid, 0))
        .await
        .expect("verify");
    let signed = env
        .sign_in_ok("oidc", person(12, "ada@example.com", true))
        .await;
    assert_eq!(signed["user"]["id"], ada.as_str());
    assert_eq!(
        signed["user"]["identities"],
        json!([{"provider": "oidc", "email": "ada@example.com"}])
    );
    env.app.shutdown().await;
}

#[tokio::test]
async fn oidc_sign_in_creates_a_user_from_the_id_token() {
    let env = env().await;
    let url = env.authorize("oidc").await;
    let q = url_pairs(Url::parse(&url).expect("url").query().expect("query"));
    assert!(q["scope"].split(' ').any(|s| s == "openid"));
    assert!(!q["nonce"].is_empty(), "OIDC requests carry a nonce");
    let consent = env
        .fake
        .consent(&env.http, &url, person(20, "new@example.com", true))
        .await;
    let code = env.callback(&consent).await.expect("signed in");
    let signed: Value = env.exchange(&code).await.json().await.expect("json");
    assert_eq!(signed["user"]["email"], "new@example.com");
    assert_eq!(signed["user"]["email_verified"], true);

    // `email_verified: false` claims no address (docs/API.md "Linking rule").
    let (code, detail) = env
        .sign_in("oidc", person(21, "other@example.com", false))
        .await
        .expect_err("refused");
    assert_eq!(code, "provider_error");
    assert!(
        detail.contains("verify your email at the provider first"),
        "{detail}"
    );
    assert_eq!(env.sql_count("SELECT COUNT(*) FROM users").await, 1);
    env.app.shutdown().await;
}

#[tokio::test]
async fn a_provider_without_email_cannot_create_or_match_an_account() {
    let env = env().await;
    let nobody = Person {
        id: 30,
        login: "ghost".into(),
        email: None,
    };
    let (code, detail) = env
        .sign_in("github", nobody.clone())
        .await
        .expect_err("refused");
    assert_eq!(code, "provider_error");
    assert!(detail.contains("email"), "{detail}");
    assert_eq!(env.sql_count("SELECT COUNT(*) FROM users").await, 0);

    // Linked from a signed-in account, the same identity is fine without an email.
    let reg = env.register("carol@example.com").await;
    let url = env.link_url("github", token(&reg)).await;
    let consent = env.fake.consent(&env.http, &url, nobody.clone()).await;
    env.callback(&consent).await.expect("linked");
    let code = env.sign_in("github", nobody).await.expect("signs in now");
    let signed: Value = env.exchange(&code).await.json().await.expect("json");
    assert_eq!(signed["user"]["id"], reg["user"]["id"]);
    env.app.shutdown().await;
}

#[tokio::test]
async fn linking_from_an_account_and_identities_in_use() {
    let env = env().await;
    let a = env.register("a@example.com").await;
    let b = env.register("b@example.com").await;
    // Read first, so the view is cached: the link must show at once anyway.
    assert_eq!(env.me(token(&a)).await["identities"], json!([]));

    // A links a GitHub account whose email differs from A's.
    let url = env.link_url("github", token(&a)).await;
    let consent = env
        .fake
        .consent(&env.http, &url, person(40, "a-work@example.com", true))
        .await;
    let code = env.callback(&consent).await.expect("linked");
    let signed: Value = env.exchange(&code).await.json().await.expect("json");
    assert_eq!(signed["user"]["id"], a["user"]["id"]);
    let me = env.me(token(&a)).await;
    assert_eq!(
        me["identities"],
        json!([{"provider": "github", "email": "a-work@example.com"}])
    );
    let a_id = a["user"]["id"].as_str().expect("id");
    assert!(
        env.audit_events(a_id)
            .await
            .contains(&"identity_linked".to_string())
    );

    // B tries to link the same GitHub account.
    let url = env.link_url("github", token(&b)).await;
    let consent = env
        .fake
        .consent(&env.http, &url, person(40, "a-work@example.com", true))
        .await;
    let (code, _) = env.callback(&consent).await.expect_err("refused");
    assert_eq!(code, "identity_in_use");
    assert_eq!(env.me(token(&b)).await["identities"], json!([]));

    // A tries to link a second GitHub account.
    let url = env.link_url("github", token(&a)).await;
    let consent = env
        .fake
        .consent(&env.http, &url, person(41, "other@example.com", true))
        .await;
    let (code, _) = env.callback(&consent).await.expect_err("refused");
    assert_eq!(code, "already_linked");

    // Signing in with the linked GitHub account reaches A.
    let signed = env
        .sign_in_ok("github", person(40, "a-work@example.com", true))
        .await;
    assert_eq!(signed["user"]["id"], a["user"]["id"]);
    env.app.shutdown().await;
}

#[tokio::test]
async fn unlinking_needs_another_way_to_sign_in_and_revokes_other_sessions() {
    let env = env().await;
    // An account made by GitHub alone has no password: its only identity stays.
    let only = env
        .sign_in_ok("github", person(50, "solo@example.com", true))
        .await;
    let r = env
        .app
        .client
        .delete(env.app.url("/api/v1/auth/identities/github"))
        .bearer_auth(token(&only))
        .send()
        .await
        .expect("delete");
    expect_problem(r, 409, "last_login_method").await;
    assert_eq!(
        env.me(token(&only)).await["identities"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    // A password account with GitHub linked may unlink it.
    let a = env.register("pw@example.com").await;
    let url = env.link_url("github", token(&a)).await;
    let consent = env
        .fake
        .consent(&env.http, &url, person(51, "pw-gh@example.com", true))
        .await;
    let code = env.callback(&consent).await.expect("linked");
    let other_session: Value = env.exchange(&code).await.json().await.expect("json");
    let delete = |t: String| {
        let req = env
            .app
            .client
            .delete(env.app.url("/api/v1/auth/identities/github"))
            .bearer_auth(t);
        async move { req.send().await.expect("delete") }
    };
    let r = delete(token(&a).to_string()).await;
    assert_eq!(r.status(), 204);
    assert_eq!(env.me(token(&a)).await["identities"], json!([]));
    // The other session (the one the GitHub sign-in made) is gone; the caller's stays.
    let r = env.app.get("/api/v1/me", Some(token(&other_session))).await;
    expect_problem(r, 401, "session_revoked").await;
    let a_id = a["user"]["id"].as_str().expect("id");
    assert!(
        env.audit_events(a_id)
            .await
            .contains(&"identity_unlinked".to_string())
    );
    // Not linked (any more): 404.
    expect_problem(delete(token(&a).to_string()).await, 404, "not_found").await;

    // The GitHub account is free again: signing in with it makes a new account.
    let fresh = env
        .sign_in_ok("github", person(51, "pw-gh@example.com", true))
        .await;
    assert_ne!(fresh["user"]["id"], a["user"]["id"]);
    env.app.shutdown().await;
}

#[tokio::test]
async fn a_disabled_account_cannot_sign_in_with_its_identity() {
    let env = env().await;
    let signed = env
        .sign_in_ok("github", person(60, "dis@example.com", true))
        .await;
    let uid = signed["user"]["id"].as_str().expect("id").to_string();
    env.app
        .state()
        .storage
        .write(move |c| warpbase::storage::users::set_disabled(c, &uid, true, 0))
        .await
        .expect("disable");
    let (code, _) = env
        .sign_in("github", person(60, "dis@example.com", true))
        .await
        .expect_err("refused");
    assert_eq!(code, "account_disabled");
    env.app.shutdown().await;
}
