//! The OpenAPI 3.1 document of the HTTP API, generated from the `#[utoipa::path]`
//! annotations that sit on each handler, served at `GET /api/v1/openapi.json`.
//!
//! This module only assembles: it lists the documented handlers, adds the security
//! schemes, and fills every error response with the problem+json body. It also holds the
//! schemas of responses that handlers build with `json!` (they have no Rust type of their
//! own), and documented-only stubs for routes that are not merged yet. It must not contain
//! behaviour: `tests/it/openapi.rs` checks that every documented route is served and every
//! served API route is documented.

use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, RefOr, Response};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::auth::routes::{SignedIn, UserView};
use crate::billing::Entitlement;
use crate::config::PlanLimits;
use crate::error::Problem;
use crate::jobs::queue::JobView;

/// The generated document.
pub fn api_doc() -> Document {
    ApiDoc::openapi()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "warpbase",
        description = "Accounts, OAuth2, Stripe billing and durable jobs with live progress. \
            Errors are `application/problem+json` with a stable `code`; every response \
            carries `x-request-id`. Lists take `?limit=` (max 100) and `?cursor=`."
    ),
    servers((url = "/")),
    paths(
        crate::ops::healthz,
        crate::ops::readyz,
        crate::ops::metrics_text,
        crate::ops::openapi_json,
        crate::auth::routes::register,
        crate::auth::routes::login,
        crate::auth::routes::refresh,
        crate::auth::routes::logout,
        crate::auth::routes::logout_all,
        crate::auth::routes::change_password,
        crate::auth::routes::reset_request,
        crate::auth::routes::reset,
        crate::auth::routes::verify_request,
        crate::auth::routes::verify,
        crate::auth::routes::sessions,
        crate::auth::routes::revoke_session,
        crate::auth::routes::me,
        crate::auth::routes::admin_users,
        crate::auth::routes::admin_claim,
        // OAuth (src/auth/oauth_flow.rs, another branch): when it merges, move each
        // attribute onto its handler and point these entries at the handlers.
        oauth_routes::providers,
        oauth_routes::authorize,
        oauth_routes::link,
        oauth_routes::callback,
        oauth_routes::exchange,
        oauth_routes::unlink,
        crate::billing::routes::plans,
        crate::billing::routes::checkout,
        crate::billing::routes::portal,
        crate::billing::routes::subscription,
        crate::billing::routes::webhook,
        crate::billing::routes::events,
        crate::billing::routes::replay,
        crate::jobs::routes::submit,
        crate::jobs::routes::list,
        crate::jobs::routes::get_job,
        crate::jobs::routes::attempts,
        crate::jobs::routes::cancel,
        crate::jobs::routes::retry,
        crate::jobs::routes::job_events,
        crate::jobs::routes::user_events,
        crate::jobs::routes::ticket,
        crate::jobs::routes::upload,
        crate::jobs::routes::delete_upload,
        crate::jobs::routes::dead_letters,
        crate::jobs::routes::discard,
    ),
    components(schemas(Problem, SignedIn, UserView, Entitlement, JobView, Plan)),
    modifiers(&SecuritySchemes, &ProblemBodies),
    tags(
        (name = "accounts", description = "Registration, sign-in, tokens, sessions, OAuth"),
        (name = "billing", description = "Plans, Stripe checkout and portal, entitlements, webhooks"),
        (name = "jobs", description = "Durable jobs, uploads and live progress (SSE)"),
        (name = "admin", description = "Admin-only views and actions"),
        (name = "ops", description = "Liveness, readiness, metrics, this document"),
    )
)]
struct ApiDoc;

/// `bearer`: the access token. `ticket`: a single-use `?ticket=` for `EventSource`.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some("The `access_token` of a `TokenPair`"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "ticket",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "ticket",
                "From `POST /api/v1/events/ticket`: single use, 60 s",
            ))),
        );
    }
}

/// Every 4xx/5xx response of the API is a problem document; the annotations only name
/// the status and the codes, and this fills in the body.
struct ProblemBodies;

impl Modify for ProblemBodies {
    fn modify(&self, doc: &mut Document) {
        let problem = ContentBuilder::new()
            .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                "Problem",
            ))))
            .build();
        for item in doc.paths.paths.values_mut() {
            let ops = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for op in ops.into_iter().flatten() {
                for (status, resp) in op.responses.responses.iter_mut() {
                    let is_error = status.starts_with('4') || status.starts_with('5');
                    if let (true, RefOr::T(resp)) = (is_error, resp) {
                        add_problem(resp, &problem);
                    }
                }
            }
        }
    }
}

fn add_problem(resp: &mut Response, problem: &utoipa::openapi::Content) {
    if resp.content.is_empty() {
        resp.content
            .insert("application/problem+json".into(), problem.clone());
    }
}

// Enumerations that the handlers keep as strings.

#[derive(Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Admin,
}

pub use crate::storage::states::{EventStatus, JobStatus};

// Response bodies the handlers build with `json!`.

#[derive(Serialize, ToSchema)]
pub struct Accepted {
    pub accepted: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Session {
    pub id: String,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub last_used_at: String,
    pub user_agent: Option<String>,
    pub ip: Option<String>,
    /// The session of the access token that asked.
    pub current: bool,
}

#[derive(Serialize, ToSchema)]
pub struct SessionList {
    pub items: Vec<Session>,
}

#[derive(Serialize, ToSchema)]
pub struct UserPage {
    pub items: Vec<UserView>,
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Plan {
    #[schema(example = "pro")]
    pub id: String,
    pub name: String,
    /// In the currency's smallest unit (cents).
    pub price: u64,
    #[schema(example = "usd")]
    pub currency: String,
    #[schema(example = "month")]
    pub interval: String,
    pub limits: PlanLimits,
    pub metered: bool,
}

#[derive(Serialize, ToSchema)]
pub struct PlanList {
    pub items: Vec<Plan>,
}

#[derive(Serialize, ToSchema)]
pub struct CheckoutSession {
    pub id: String,
    /// Where to send the browser (the built-in fake Stripe page in offline mode).
    pub url: String,
}

#[derive(Serialize, ToSchema)]
pub struct PortalSession {
    pub url: String,
}

#[derive(Serialize, ToSchema)]
pub struct WebhookReceipt {
    pub received: bool,
    /// This event id was processed before; nothing was applied again.
    pub duplicate: bool,
    pub status: EventStatus,
}

#[derive(Serialize, ToSchema)]
pub struct BillingEvent {
    pub id: String,
    #[serde(rename = "type")]
    #[schema(example = "invoice.paid")]
    pub type_: String,
    pub status: EventStatus,
    pub reason: Option<String>,
    pub user_id: Option<String>,
    pub attempts: u32,
    /// When Stripe created the event.
    #[schema(format = DateTime)]
    pub created: String,
    #[schema(format = DateTime)]
    pub received_at: String,
    #[schema(format = DateTime)]
    pub processed_at: String,
}

#[derive(Serialize, ToSchema)]
pub struct BillingEventPage {
    pub items: Vec<BillingEvent>,
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct ReplayResult {
    pub id: String,
    pub status: EventStatus,
}

#[derive(Serialize, ToSchema)]
pub struct JobPage {
    pub items: Vec<JobView>,
    pub next_cursor: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct Attempt {
    pub attempt: u32,
    #[schema(format = DateTime)]
    pub started_at: String,
    #[schema(format = DateTime)]
    pub finished_at: String,
    pub outcome: String,
    pub error: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct AttemptList {
    pub items: Vec<Attempt>,
}

#[derive(Serialize, ToSchema)]
pub struct Ticket {
    pub ticket: String,
    /// Seconds.
    pub expires_in: u64,
}

#[derive(Serialize, ToSchema)]
pub struct Upload {
    pub id: String,
    pub size: u64,
    pub sha256: String,
}

/// A form whose first file is the archive.
#[derive(ToSchema)]
pub struct UploadForm {
    #[schema(value_type = String, format = Binary)]
    pub file: Vec<u8>,
}

/// The OAuth routes (handlers `oauth_*` in src/auth/routes.rs, logic in
/// src/auth/oauth_flow.rs), documented here because their 302 answers and query
/// parameters are easier to describe apart from the thin handlers. tests/it/openapi.rs checks
/// that these paths are served and that their security matches.
pub mod oauth_routes {
    #![allow(dead_code)]

    use super::*;

    #[derive(Serialize, ToSchema)]
    pub struct Provider {
        #[schema(example = "github")]
        pub id: String,
        #[schema(example = "GitHub")]
        pub name: String,
    }

    #[derive(Serialize, ToSchema)]
    pub struct ProviderList {
        pub items: Vec<Provider>,
    }

    #[derive(Serialize, ToSchema)]
    pub struct AuthorizeUrl {
        pub authorize_url: String,
    }

    #[derive(serde::Deserialize, ToSchema)]
    #[serde(deny_unknown_fields)]
    pub struct ExchangeBody {
        /// The one-time code from the callback redirect (60 s, single use).
        pub code: String,
    }

    #[utoipa::path(get, path = "/api/v1/auth/providers", tag = "accounts",
        responses((status = 200, description = "The enabled OAuth providers", body = ProviderList)))]
    pub fn providers() {}

    #[utoipa::path(get, path = "/api/v1/auth/oauth/{provider}/authorize", tag = "accounts",
        params(("provider" = String, Path, description = "`github`, `google` or `oidc`")),
        responses((status = 302, description = "To the provider, with `state`, `code_challenge` (S256) and `nonce` (OIDC); \
                sets the HttpOnly browser-binding cookie the callback and exchange require",
                headers(("location" = String), ("set-cookie" = String))),
            (status = 404, description = "`not_found`: the provider is not enabled")))]
    pub fn authorize() {}

    #[utoipa::path(post, path = "/api/v1/auth/oauth/{provider}/link", tag = "accounts",
        security(("bearer" = [])),
        params(("provider" = String, Path, description = "`github`, `google` or `oidc`")),
        responses((status = 200, description = "Where to send the browser to link this provider to the account; \
                sets the browser-binding cookie, so only this browser can complete the link", body = AuthorizeUrl,
                headers(("set-cookie" = String))),
            (status = 401, description = "`unauthorized`"),
            (status = 404, description = "`not_found`: the provider is not enabled")))]
    pub fn link() {}

    #[utoipa::path(get, path = "/api/v1/auth/oauth/{provider}/callback", tag = "accounts",
        params(("provider" = String, Path, description = "`github`, `google` or `oidc`"),
            ("code" = Option<String>, Query, description = "From the provider"),
            ("state" = Option<String>, Query, description = "From the provider")),
        responses((status = 302, description = "To `{public_url}/#/auth/complete?code=<one-time exchange code>`, \
                or on failure to `/#/auth/error?code=<invalid_state|account_exists|provider error>`",
            headers(("location" = String)))))]
    pub fn callback() {}

    #[utoipa::path(post, path = "/api/v1/auth/oauth/exchange", tag = "accounts",
        request_body = ExchangeBody,
        responses((status = 200, description = "Signed in", body = SignedIn),
            (status = 400, description = "`invalid_grant`: used or expired code; malformed JSON. \
                `invalid_state`: the browser-binding cookie set at authorize is missing or belongs to another browser"),
            (status = 415, description = "Not JSON"),
            (status = 422, description = "`invalid_input`")))]
    pub fn exchange() {}

    #[utoipa::path(delete, path = "/api/v1/auth/identities/{provider}", tag = "accounts",
        security(("bearer" = [])),
        params(("provider" = String, Path, description = "`github`, `google` or `oidc`")),
        responses((status = 204, description = "The identity is unlinked"),
            (status = 401, description = "`unauthorized`"),
            (status = 404, description = "`not_found`: no such linked identity"),
            (status = 409, description = "`last_login_method`: it would leave no way to sign in")))]
    pub fn unlink() {}
}
