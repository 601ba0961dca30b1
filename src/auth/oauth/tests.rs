//! A fake OAuth/OIDC provider served on 127.0.0.1:0, and the flows against it.
//!
//! The fake is strict where a broken client would otherwise pass: it checks PKCE
//! (SHA-256 of the verifier against the recorded challenge), client credentials, the
//! redirect URI and single use of codes, and it signs ID tokens with the nonce it was
//! given — or, per [`Mint`], deliberately wrong ones.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::google::GOOGLE_ISSUER;
use super::oidc::select_key;
use super::*;

// Test keys, generated once with `openssl genrsa 2048` / `openssl ecparam -name prime256v1`
// (PKCS#8). They sign nothing outside these tests.
const RSA_KEY_1: &str = "-----BEGIN PRIVATE KEY-----\n\
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
/// The public half of RSA_KEY_1 as a JWK (base64url n, e).
const RSA_1_N: &str = "nneWB8dsW4dUT2VWoygKvQqhaCxsg074LC5hDPibT4RaRSCT-aoN5S3Qf-uCAJIM52GHxXpqT3yWVkMc6Ml_UoCutt64IhGz7RcA5lE6OyCe9SlVc8ml5b4N4eYlsadt5g8seTPBDuU6rIxj2qVMdseO5Gi8f5EPbZ338rmFVpcivvQF7M4_7RMD6xYH4N2RQw-kCEya0q8sTz187mFkMhscHapaTlawn4FUzyjjY5Xt8SA0UlFWSBTLwIPcXZVa3eRKw7ADDIKEyd5-n_4aHyDmkP95QNS_FMFBOMQ6gFBTA68WnyKRJmWBdka5Oi_pxmlxTf-CJ-kwm5IjucX2wQ";
const RSA_1_E: &str = "AQAB";
/// A second key the provider never published: tokens signed with it must be refused.
const RSA_KEY_2: &str = "-----BEGIN PRIVATE KEY-----\n\
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCwX/vYHsJvaKvk\n\
bE+pVgzxfRv3pfAf13M1Z+rNW8l4uGlrYhd7SD58vIqY3i9nnDoWoZz4v15F/Fgy\n\
+OHbo/fvsRA0pb4SGcOi9p0HhE4R1wodZzAzzed/MBLcGgohP1a6GVq6WjrDs3t4\n\
ws+B9NnHptoP0BLH4k+Ctscxlljlm2D5lptLWh2xvz5tt+LMOchkIYhG6zS4QxYy\n\
xA3CYuiL5kX36VsPI0wrcKnA3QcnYDAhzhnW+1STya5NbHxCucjeTcnXc1xj6w2B\n\
Ct1X8pRPJi2AtCVrTRPBwFWA8TOyLJkVjTR4f5KfWp2hCkBObMddw1coXKJZR0Xs\n\
Tw+dOHftAgMBAAECggEADm3TyyL9EiM0iMvpmnddOLZc/t4W7mvwU2qsdV9wdI1V\n\
poDQXfgTkJ3WEtp+c1H/GJHhJyJ0wnH5/zWIOLFJ29SW+E+k5JMyA5d8UjybLG90\n\
tuIVue865JdYu6PvtzeYz0G6v+sYyqDY1ZDObBnNZT17snZ5yttzWMS+OArOO/5e\n\
3AKB6rW93amQYljhSH9Usdqpp24GKz1JdxApbVLH/5jyhLrBQO28RntdR+eS8iZm\n\
WfXJaVpFgZ1OIjHb7QGVg8K282uDx5sn+d3QGLNZ0QlrN5dN0rC5jn3EhyROj+f7\n\
+XZH/O3ZvYvf/ChAhKLatPvpvO83bmWUX3gAnVywgQKBgQDeCPaE/z/YWjM0gKAX\n\
ZCZZ8FpzZm442rgDkLXmPvKSD9I7fQeMMrKOQChVQTiuFRpO1lEWkxYpOS1i5ZNk\n\
o7ptCNq2ETGYP2+IiRSjIJB7+XxZfh65TE4Le59DkpEXSkQqifzjhMjWnjR7530u\n\
O/NKlGa+mWE31lxyJoojwtA8rQKBgQDLWvE207kHXrBNEFeUVdSuf0SP/YKpP8M9\n\
BDHk4c1uRNYtlxBpJkJSPMHuZqEJXprxWEc1AwVhyrs/RxfmFtH5MbYUy2pRhKA1\n\
rqe1NtAOuAM/axpI6EZhMadcIrcGsb9sEJnSBzn8Lrf/9y6kEQY7TuH+Jjm7v7lA\n\
ii+WAk9QQQKBgQCt9BW3cwcBKQHvA0rpqJQHaLBksv5t2qXKXUi1n+GJn42U/8q3\n\
A00y937h9FxEvtHCrFQRPKFjIKG3VqfYdBHttL8tX2Ecp65pKQSbHTs1dev/bTkC\n\
8Y4/ntXTKfQ0bAHl1f/j/LcgtgfmfyFq5JsidgvdDevFxFLfN+SISeu9bQKBgBMC\n\
JzYGyG7l7PjnJCibdUvyXYhQHByR90AG2lsYuEksahDM5B3QE7b4MvCD612i2Dzj\n\
EZTk+WXQu3wIuzUowOvYN7rt4LxJ92fNMaQAwaX+kV8mNcjG3X1MVOaJ4C3iA5Co\n\
ZJh7UHJAM7bbdiKj7L8yenF1RURFgZ2EzTnqcVuBAoGBANHO2hgNy9WhoUwKKqjx\n\
xH1ULzGBfrH29lBxJeN5vpSa/83penQKG9+s4J1uDe8CqKTCt6hXf2AJHkVauyx0\n\
EBoWhHyTvxjXSZj8FMNRQhU4sTgOcVcdXp0Ft830xnVvUGkFGleN+6u4YIUBnYfW\n\
GP7zTsWirXtuzuoVJ+im1ka5\n\
-----END PRIVATE KEY-----\n\
";
const EC_KEY: &str = "-----BEGIN PRIVATE KEY-----\n\
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgx0+xqioDdZRD5Ogn\n\
BGgb2JWg2pthzb+t6SIQy6IMpdWhRANCAAR92eS+O+PVHMsji/iC8EsPxb4Z1EZk\n\
CS83vstPFIBT5aDLrN5ArQwUFhu/krqBW5m8dElsqjPDM3eKzyLf677u\n\
-----END PRIVATE KEY-----\n\
";
const EC_X: &str = "fdnkvjvj1RzLI4v4gvBLD8W-GdRGZAkvN77LTxSAU-U";
const EC_Y: &str = "oMus3kCtDBQWG7-SuoFbmbx0SWyqM8Mzd4rPIt_rvu4";

const CLIENT_ID: &str = "test-client";
const CLIENT_SECRET: &str = "s3cret-client-value";
const PUBLIC_URL: &str = "https://warpbase.test";

/// How the fake's next ID token is made.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
enum Mint {
    #[default]
    Good,
    Es256,
    WrongNonce,
    WrongAudience,
    WrongIssuer,
    Expired,
    BadSignature,
    UnknownKid,
    NoIdToken,
}

struct Grant {
    challenge: String,
    nonce: Option<String>,
    redirect_uri: String,
    openid: bool,
}

#[derive(Default)]
struct FakeState {
    base: String,
    grants: HashMap<String, Grant>,
    access_tokens: HashSet<String>,
    mint: Mint,
    /// GitHub answers token errors with 200 and an `error` field.
    github_style_errors: bool,
    /// The token endpoint answers 307 to `/token-elsewhere`.
    redirect_token: bool,
    github_user: Value,
    github_emails: Value,
    discovery_hits: usize,
    jwks_hits: usize,
    elsewhere_hits: usize,
}

type Shared = Arc<Mutex<FakeState>>;

struct Fake {
    base: String,
    state: Shared,
}

impl Fake {
    async fn start() -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state: Shared = Arc::new(Mutex::new(FakeState {
            base: base.clone(),
            github_user: json!({"id": 4242, "login": "octocat", "name": "Octo Cat", "email": null}),
            github_emails: json!([
                {"email": "old@example.com", "primary": false, "verified": true},
                {"email": "Octo@Example.COM", "primary": true, "verified": true},
            ]),
            ..FakeState::default()
        }));
        let app = Router::new()
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .route("/token-elsewhere", post(token_elsewhere))
            .route("/api/user", get(github_user))
            .route("/api/user/emails", get(github_emails))
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/mismatch/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Fake { base, state }
    }

    fn set(&self, f: impl FnOnce(&mut FakeState)) {
        f(&mut self.state.lock().unwrap());
    }

    fn get<T>(&self, f: impl FnOnce(&FakeState) -> T) -> T {
        f(&self.state.lock().unwrap())
    }

    fn configs(&self) -> OAuthConfigs {
        let base = &self.base;
        OAuthConfigs {
            github: Some(GithubConfig {
                client_id: CLIENT_ID.into(),
                client_secret: CLIENT_SECRET.into(),
                auth_url: format!("{base}/authorize"),
                token_url: format!("{base}/token"),
                api_url: format!("{base}/api/"),
            }),
            google: Some(GoogleConfig {
                client_id: CLIENT_ID.into(),
                client_secret: CLIENT_SECRET.into(),
                issuer: base.clone(),
                auth_url: format!("{base}/authorize"),
                token_url: format!("{base}/token"),
                jwks_url: format!("{base}/jwks"),
            }),
            oidc: Some(OidcConfig {
                issuer: format!("{base}/"),
                client_id: CLIENT_ID.into(),
                client_secret: CLIENT_SECRET.into(),
                name: "Fake SSO".into(),
                scopes: vec!["email".into(), "profile".into()],
            }),
        }
    }

    fn providers(&self) -> OAuthProviders {
        OAuthProviders::new(&self.configs(), PUBLIC_URL).unwrap()
    }
}

fn random_hex() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn oauth_error(status: StatusCode, code: &str) -> Response {
    (status, Json(json!({"error": code}))).into_response()
}

async fn authorize(State(s): State<Shared>, Query(q): Query<HashMap<String, String>>) -> Response {
    let param = |k: &str| q.get(k).cloned().unwrap_or_default();
    if param("response_type") != "code"
        || param("client_id") != CLIENT_ID
        || param("code_challenge_method") != "S256"
        || param("code_challenge").is_empty()
        || param("state").is_empty()
    {
        return (StatusCode::BAD_REQUEST, "bad authorization request").into_response();
    }
    let code = random_hex();
    let redirect_uri = param("redirect_uri");
    s.lock().unwrap().grants.insert(
        code.clone(),
        Grant {
            challenge: param("code_challenge"),
            nonce: q.get("nonce").cloned(),
            redirect_uri: redirect_uri.clone(),
            openid: param("scope").split(' ').any(|s| s == "openid"),
        },
    );
    let Ok(location) =
        Url::parse_with_params(&redirect_uri, &[("code", code), ("state", param("state"))])
    else {
        return (StatusCode::BAD_REQUEST, "bad redirect_uri").into_response();
    };
    (
        StatusCode::FOUND,
        [(header::LOCATION, location.to_string())],
    )
        .into_response()
}

fn client_authenticated(headers: &HeaderMap, form: &HashMap<String, String>) -> bool {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    if let Some(pair) = basic {
        return pair == format!("{CLIENT_ID}:{CLIENT_SECRET}");
    }
    form.get("client_id").map(String::as_str) == Some(CLIENT_ID)
        && form.get("client_secret").map(String::as_str) == Some(CLIENT_SECRET)
}

async fn token(
    State(s): State<Shared>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut st = s.lock().unwrap();
    if st.redirect_token {
        let to = format!("{}/token-elsewhere", st.base);
        return (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)]).into_response();
    }
    let error_status = if st.github_style_errors {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    let grant_error = if st.github_style_errors {
        "bad_verification_code"
    } else {
        "invalid_grant"
    };
    if !client_authenticated(&headers, &form) {
        return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client");
    }
    if form.get("grant_type").map(String::as_str) != Some("authorization_code") {
        return oauth_error(error_status, "unsupported_grant_type");
    }
    // Codes are single use, as at any real provider.
    let Some(grant) = form.get("code").and_then(|c| st.grants.remove(c)) else {
        return oauth_error(error_status, grant_error);
    };
    if form.get("redirect_uri") != Some(&grant.redirect_uri) {
        return oauth_error(error_status, grant_error);
    }
    // RFC 7636 §4.6: BASE64URL(SHA256(code_verifier)) must equal the challenge.
    let verifier = form.get("code_verifier").cloned().unwrap_or_default();
    if URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())) != grant.challenge {
        return oauth_error(error_status, grant_error);
    }
    let access = random_hex();
    st.access_tokens.insert(access.clone());
    let mut body = json!({"access_token": access, "token_type": "bearer", "expires_in": 3600});
    if grant.openid && st.mint != Mint::NoIdToken {
        body["id_token"] = json!(mint_id_token(&st.base, grant.nonce, st.mint));
    }
    Json(body).into_response()
}

async fn token_elsewhere(State(s): State<Shared>) -> Response {
    s.lock().unwrap().elsewhere_hits += 1;
    Json(json!({"access_token": "stolen", "token_type": "bearer"})).into_response()
}

fn mint_id_token(base: &str, nonce: Option<String>, mint: Mint) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let mut claims = json!({
        "iss": base,
        "sub": "oidc-user-1",
        "aud": CLIENT_ID,
        "azp": CLIENT_ID,
        "iat": now,
        "exp": now + 300,
        "nonce": nonce,
        "email": "Oidc.User@Example.COM",
        "email_verified": true,
        "name": "Oidc User",
    });
    match mint {
        Mint::WrongNonce => claims["nonce"] = json!("some-other-nonce"),
        Mint::WrongAudience => {
            claims["aud"] = json!("another-client");
            claims["azp"] = json!("another-client");
        }
        Mint::WrongIssuer => claims["iss"] = json!("https://evil.example"),
        Mint::Expired => {
            claims["iat"] = json!(now - 7200);
            claims["exp"] = json!(now - 3600);
        }
        _ => {}
    }
    let (alg, kid, key) = match mint {
        Mint::Es256 => (
            Algorithm::ES256,
            "e1",
            EncodingKey::from_ec_pem(EC_KEY.as_bytes()).unwrap(),
        ),
        // Claims the published key id, but is signed by a key nobody published.
        Mint::BadSignature => (
            Algorithm::RS256,
            "k1",
            EncodingKey::from_rsa_pem(RSA_KEY_2.as_bytes()).unwrap(),
        ),
        Mint::UnknownKid => (
            Algorithm::RS256,
            "k9",
            EncodingKey::from_rsa_pem(RSA_KEY_1.as_bytes()).unwrap(),
        ),
        _ => (
            Algorithm::RS256,
            "k1",
            EncodingKey::from_rsa_pem(RSA_KEY_1.as_bytes()).unwrap(),
        ),
    };
    let mut header = Header::new(alg);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn bearer_ok(s: &Shared, headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| s.lock().unwrap().access_tokens.contains(t))
}

async fn github_user(State(s): State<Shared>, headers: HeaderMap) -> Response {
    if !bearer_ok(&s, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    Json(s.lock().unwrap().github_user.clone()).into_response()
}

async fn github_emails(State(s): State<Shared>, headers: HeaderMap) -> Response {
    if !bearer_ok(&s, &headers) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    Json(s.lock().unwrap().github_emails.clone()).into_response()
}

async fn discovery(State(s): State<Shared>) -> Json<Value> {
    let mut st = s.lock().unwrap();
    st.discovery_hits += 1;
    let base = &st.base;
    Json(json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"),
        "jwks_uri": format!("{base}/jwks"),
        "response_types_supported": ["code"],
        "id_token_signing_alg_values_supported": ["RS256", "ES256"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
    }))
}

async fn jwks(State(s): State<Shared>) -> Json<Value> {
    s.lock().unwrap().jwks_hits += 1;
    Json(json!({"keys": [
        // A key type we cannot use must not hide the others.
        {"kty": "OKP", "crv": "X448", "x": "AAAA", "kid": "x1", "use": "sig"},
        {"kty": "RSA", "kid": "k1", "use": "sig", "alg": "RS256", "n": RSA_1_N, "e": RSA_1_E},
        {"kty": "EC", "kid": "e1", "use": "sig", "alg": "ES256", "crv": "P-256", "x": EC_X, "y": EC_Y},
    ]}))
}

/// Plays the browser: follows the authorization URL to the fake, which redirects to our
/// callback; returns the callback's `code` and `state`.
async fn browser(provider: &str, start: &AuthStart) -> (String, String) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = client.get(&start.url).send().await.unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::FOUND,
        "authorize refused {}",
        start.url
    );
    let location = resp.headers()[header::LOCATION].to_str().unwrap();
    let callback = Url::parse(location).unwrap();
    assert_eq!(
        callback.as_str().split('?').next().unwrap(),
        format!("{PUBLIC_URL}/api/v1/auth/oauth/{provider}/callback")
    );
    let q: HashMap<String, String> = callback.query_pairs().into_owned().collect();
    (q["code"].clone(), q["state"].clone())
}

/// start → browser → finish, with the verifier and nonce from start.
async fn sign_in(p: &OAuthProviders, provider: &str) -> Result<ProviderIdentity, OAuthError> {
    let start = p.start(provider).await.unwrap();
    let (code, state) = browser(provider, &start).await;
    assert_eq!(state, start.state);
    p.finish(provider, code, start.pkce_verifier, start.nonce)
        .await
}

fn query(url: &str) -> HashMap<String, String> {
    Url::parse(url)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

#[tokio::test]
async fn github_full_flow() {
    let fake = Fake::start().await;
    let p = fake.providers();
    let start = p.start(GITHUB).await.unwrap();
    let q = query(&start.url);
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["state"], start.state);
    assert_eq!(q["scope"], "read:user user:email");
    assert!(start.nonce.is_none());
    assert!(!start.url.contains(&start.pkce_verifier));

    let (code, _) = browser(GITHUB, &start).await;
    let id = p
        .finish(GITHUB, code, start.pkce_verifier, None)
        .await
        .unwrap();
    assert_eq!(
        id,
        ProviderIdentity {
            provider: "github".into(),
            subject: "4242".into(),
            email: Some("octo@example.com".into()),
            email_verified: true,
            name: Some("Octo Cat".into()),
        }
    );
}

#[tokio::test]
async fn github_wrong_verifier_is_rejected_by_the_provider() {
    let fake = Fake::start().await;
    fake.set(|s| s.github_style_errors = true);
    let p = fake.providers();
    let start = p.start(GITHUB).await.unwrap();
    let (code, _) = browser(GITHUB, &start).await;
    let other = p.start(GITHUB).await.unwrap().pkce_verifier;
    let err = p
        .finish(GITHUB, code.clone(), other.clone(), None)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OAuthError::Exchange { provider: "github", reason } if reason == "bad_verification_code"),
        "{err:?}"
    );
    let shown = format!("{err} {err:?}");
    for secret in [CLIENT_SECRET, &code, &other, &start.pkce_verifier] {
        assert!(!shown.contains(secret), "error leaks a secret: {shown}");
    }
    // The code is single use at the fake, so even the right verifier now fails; this
    // shows the failure above was the verifier, not a broken flow: a fresh start works.
    assert!(sign_in(&p, GITHUB).await.is_ok());
}

#[tokio::test]
async fn github_without_a_verified_primary_email_is_unverified() {
    let fake = Fake::start().await;
    let p = fake.providers();
    // A verified secondary address must not stand in for an unverified primary one.
    fake.set(|s| {
        s.github_emails = json!([
            {"email": "Primary@Example.com", "primary": true, "verified": false},
            {"email": "other@example.com", "primary": false, "verified": true},
        ])
    });
    let id = sign_in(&p, GITHUB).await.unwrap();
    assert_eq!(id.email.as_deref(), Some("primary@example.com"));
    assert!(!id.email_verified);

    // No addresses at all (and none on the profile), and no display name: login used.
    fake.set(|s| {
        s.github_emails = json!([]);
        s.github_user = json!({"id": 7, "login": "ghost", "name": null, "email": null});
    });
    let id = sign_in(&p, GITHUB).await.unwrap();
    assert_eq!(id.subject, "7");
    assert_eq!(id.email, None);
    assert!(!id.email_verified);
    assert_eq!(id.name.as_deref(), Some("ghost"));
}

#[tokio::test]
async fn oidc_full_flow_with_discovery_and_caching() {
    let fake = Fake::start().await;
    let p = fake.providers();
    let start = p.start(OIDC).await.unwrap();
    let q = query(&start.url);
    let nonce = start.nonce.clone().expect("OIDC start has a nonce");
    assert_eq!(q["nonce"], nonce);
    assert_eq!(q["code_challenge_method"], "S256");
    assert_eq!(q["scope"], "openid email profile");
    assert!(q["redirect_uri"].ends_with("/api/v1/auth/oauth/oidc/callback"));

    let (code, state) = browser(OIDC, &start).await;
    assert_eq!(state, start.state);
    let id = p
        .finish(OIDC, code, start.pkce_verifier, start.nonce)
        .await
        .unwrap();
    assert_eq!(
        id,
        ProviderIdentity {
            provider: "oidc".into(),
            subject: "oidc-user-1".into(),
            email: Some("oidc.user@example.com".into()),
            email_verified: true,
            name: Some("Oidc User".into()),
        }
    );
    // A second sign-in reuses the discovery document and the key set.
    sign_in(&p, OIDC).await.unwrap();
    assert_eq!(fake.get(|s| (s.discovery_hits, s.jwks_hits)), (1, 1));
}

#[tokio::test]
async fn google_uses_fixed_endpoints_and_accepts_es256() {
    let fake = Fake::start().await;
    let p = fake.providers();
    fake.set(|s| s.mint = Mint::Es256);
    let id = sign_in(&p, GOOGLE).await.unwrap();
    assert_eq!(id.provider, "google");
    assert_eq!(id.subject, "oidc-user-1");
    assert!(id.email_verified);
    fake.set(|s| s.mint = Mint::Good);
    assert!(sign_in(&p, GOOGLE).await.is_ok());
    assert_eq!(fake.get(|s| s.discovery_hits), 0);
}

#[tokio::test]
async fn oidc_wrong_verifier_is_rejected_by_the_provider() {
    let fake = Fake::start().await;
    let p = fake.providers();
    let start = p.start(OIDC).await.unwrap();
    let (code, _) = browser(OIDC, &start).await;
    let err = p
        .finish(OIDC, code, "x".repeat(64), start.nonce)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OAuthError::Exchange { provider: "oidc", reason } if reason == "invalid_grant"),
        "{err:?}"
    );
}

#[tokio::test]
async fn bad_id_tokens_are_rejected() {
    let fake = Fake::start().await;
    let p = fake.providers();
    let cases = [
        (Mint::WrongNonce, IdTokenProblem::WrongNonce),
        (Mint::WrongAudience, IdTokenProblem::WrongAudience),
        (Mint::WrongIssuer, IdTokenProblem::WrongIssuer),
        (Mint::Expired, IdTokenProblem::Expired),
        (Mint::BadSignature, IdTokenProblem::BadSignature),
        (Mint::UnknownKid, IdTokenProblem::UnknownKey),
        (Mint::NoIdToken, IdTokenProblem::Missing),
    ];
    for provider in [OIDC, GOOGLE] {
        for (mint, problem) in cases {
            fake.set(|s| s.mint = mint);
            let err = sign_in(&p, provider).await.unwrap_err();
            match err {
                OAuthError::InvalidIdToken {
                    provider: got,
                    problem: p,
                } if got == provider && p == problem => {}
                other => panic!("{provider} {mint:?}: expected {problem:?}, got {other:?}"),
            }
        }
    }
    // An unknown kid right after a fetch does not make us refetch the key set.
    assert_eq!(fake.get(|s| s.jwks_hits), 2, "one fetch per provider");
    // The good token still passes, so the rejections above were about the tokens.
    fake.set(|s| s.mint = Mint::Good);
    assert!(sign_in(&p, OIDC).await.is_ok());
}

#[tokio::test]
async fn finishing_oidc_without_the_nonce_is_refused() {
    let fake = Fake::start().await;
    let p = fake.providers();
    let start = p.start(OIDC).await.unwrap();
    let (code, _) = browser(OIDC, &start).await;
    let err = p
        .finish(OIDC, code, start.pkce_verifier, None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OAuthError::InvalidIdToken {
                problem: IdTokenProblem::WrongNonce,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn redirects_from_the_token_endpoint_are_not_followed() {
    let fake = Fake::start().await;
    let p = fake.providers();
    fake.set(|s| s.redirect_token = true);
    let err = sign_in(&p, GITHUB).await.unwrap_err();
    assert!(matches!(err, OAuthError::Exchange { .. }), "{err:?}");
    assert_eq!(fake.get(|s| s.elsewhere_hits), 0);
}

#[tokio::test]
async fn discovery_must_name_the_configured_issuer() {
    let fake = Fake::start().await;
    let mut configs = fake.configs();
    if let Some(oidc) = configs.oidc.as_mut() {
        oidc.issuer = format!("{}/mismatch", fake.base);
    }
    let p = OAuthProviders::new(&configs, PUBLIC_URL).unwrap();
    let err = p.start(OIDC).await.unwrap_err();
    assert!(
        matches!(
            err,
            OAuthError::Provider {
                provider: "oidc",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn unreachable_provider_is_an_http_error() {
    // Bind and drop a listener to get a local port with nothing behind it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let configs = OAuthConfigs {
        oidc: Some(OidcConfig {
            issuer: format!("http://127.0.0.1:{port}"),
            client_id: CLIENT_ID.into(),
            client_secret: CLIENT_SECRET.into(),
            ..OidcConfig::default()
        }),
        ..OAuthConfigs::default()
    };
    let p = OAuthProviders::new(&configs, PUBLIC_URL).unwrap();
    let err = p.start(OIDC).await.unwrap_err();
    assert!(
        matches!(
            err,
            OAuthError::Http {
                provider: "oidc",
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn enabled_providers_and_unknown_ones() {
    let fake = Fake::start().await;
    let p = fake.providers();
    assert_eq!(
        p.enabled(),
        vec![
            ("github", "GitHub".to_string()),
            ("google", "Google".to_string()),
            ("oidc", "Fake SSO".to_string()),
        ]
    );
    for name in ["gitlab", "", "GitHub"] {
        assert!(matches!(
            p.start(name).await,
            Err(OAuthError::UnknownProvider(_))
        ));
    }
    let none = OAuthProviders::new(&OAuthConfigs::default(), PUBLIC_URL).unwrap();
    assert!(none.enabled().is_empty());
    assert!(matches!(
        none.start(GITHUB).await,
        Err(OAuthError::UnknownProvider(_))
    ));
}

#[test]
fn configuration_is_checked_and_secrets_are_redacted() {
    let github = |auth_url: &str, client_id: &str| OAuthConfigs {
        github: Some(GithubConfig {
            client_id: client_id.into(),
            client_secret: CLIENT_SECRET.into(),
            auth_url: auth_url.into(),
            ..GithubConfig::default()
        }),
        ..OAuthConfigs::default()
    };
    let cases = [
        ("https://github.com/login/oauth/authorize", "id", true),
        ("http://localhost:9000/authorize", "id", true),
        ("http://127.0.0.1:9000/authorize", "id", true),
        ("http://[::1]:9000/authorize", "id", true),
        ("http://github.example/authorize", "id", false),
        ("ftp://github.com/", "id", false),
        ("not a url", "id", false),
        ("https://github.com/login/oauth/authorize", "", false),
    ];
    for (url, id, ok) in cases {
        let result = OAuthProviders::new(&github(url, id), PUBLIC_URL);
        assert_eq!(result.is_ok(), ok, "{url} {id:?}: {result:?}");
        if let Err(e) = result {
            assert!(matches!(e, OAuthError::Config(_)));
            assert!(!e.to_string().contains(CLIENT_SECRET));
        }
    }
    let configs: OAuthConfigs = serde_json::from_value(json!({
        "github": {"client_id": "a", "client_secret": CLIENT_SECRET},
        "google": {"client_id": "b", "client_secret": CLIENT_SECRET},
        "oidc": {"issuer": "https://sso.example", "client_id": "c", "client_secret": CLIENT_SECRET},
    }))
    .unwrap();
    let github = configs.github.as_ref().unwrap();
    assert_eq!(github.api_url, "https://api.github.com");
    assert_eq!(configs.google.as_ref().unwrap().issuer, GOOGLE_ISSUER);
    assert_eq!(configs.oidc.as_ref().unwrap().name, "Single sign-on");
    assert!(!format!("{configs:?}").contains(CLIENT_SECRET));
    let typo = serde_json::from_value::<OAuthConfigs>(
        json!({"github": {"client_id": "a", "clientsecret": "x"}}),
    );
    assert!(typo.is_err(), "unknown fields are refused");
}

#[tokio::test]
async fn auth_start_debug_hides_the_verifier() {
    let fake = Fake::start().await;
    let start = fake.providers().start(OIDC).await.unwrap();
    let shown = format!("{start:?}");
    assert!(!shown.contains(&start.pkce_verifier));
    assert!(shown.contains("[redacted]"));
}

#[test]
fn key_selection() {
    let keys: Vec<Jwk> = serde_json::from_value(json!([
        {"kty": "RSA", "kid": "k1", "alg": "RS256", "n": RSA_1_N, "e": RSA_1_E},
        {"kty": "RSA", "kid": "k2", "use": "enc", "n": RSA_1_N, "e": RSA_1_E},
        {"kty": "EC", "kid": "e1", "crv": "P-256", "x": EC_X, "y": EC_Y},
    ]))
    .unwrap();
    let kid = |k: Option<&Jwk>| k.and_then(|k| k.common.key_id.clone());
    assert_eq!(
        kid(select_key(&keys, Algorithm::RS256, Some("k1"))),
        Some("k1".into())
    );
    // Encryption keys never verify signatures.
    assert_eq!(kid(select_key(&keys, Algorithm::RS256, Some("k2"))), None);
    // The key type must fit the algorithm.
    assert_eq!(kid(select_key(&keys, Algorithm::ES256, Some("k1"))), None);
    assert_eq!(
        kid(select_key(&keys, Algorithm::ES256, None)),
        Some("e1".into())
    );
    // Without a kid there is exactly one usable RSA key here (k2 is for encryption).
    assert_eq!(
        kid(select_key(&keys, Algorithm::RS256, None)),
        Some("k1".into())
    );
    let mut two = keys.clone();
    two[1].common.public_key_use = None;
    assert_eq!(
        kid(select_key(&two, Algorithm::RS256, None)),
        None,
        "ambiguous"
    );
}

#[tokio::test]
async fn tokens_with_hs256_or_alg_none_are_refused_before_any_key_lookup() {
    let fake = Fake::start().await;
    let p = fake.providers();
    let oidc = p.inner.oidc.as_ref().unwrap();
    let endpoints = oidc.endpoints(&p.inner.http).await.unwrap();
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "x", "iss": fake.base, "aud": CLIENT_ID, "exp": 4_000_000_000u64, "nonce": "n"}),
        &EncodingKey::from_secret(CLIENT_SECRET.as_bytes()),
    )
    .unwrap();
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
        URL_SAFE_NO_PAD.encode(br#"{"sub":"x"}"#)
    );
    for (token, problem) in [
        (hs.as_str(), IdTokenProblem::UnsupportedAlgorithm),
        (none.as_str(), IdTokenProblem::Malformed),
        ("garbage", IdTokenProblem::Malformed),
    ] {
        let err = oidc
            .validate(&p.inner.http, &endpoints, token, "n")
            .await
            .unwrap_err();
        assert!(
            matches!(err, OAuthError::InvalidIdToken { problem: p, .. } if p == problem),
            "{token}: {err:?}"
        );
    }
    assert_eq!(fake.get(|s| s.jwks_hits), 0);
}
