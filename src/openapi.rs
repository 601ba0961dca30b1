//! The OpenAPI 3.1 document of the HTTP API, served at `GET /api/v1/openapi.json`.
//!
//! The paths come from the router: each module routes its handlers with utoipa-axum's
//! `routes!`, which takes the path and method from the handler's `#[utoipa::path]`, so a
//! handler is routed and documented by the same line ([`crate::http::api_routes`]). This
//! module adds what is not a path: info, the security schemes, the problem+json body of
//! every error response, and the schemas of responses that handlers build with `json!`
//! (they have no Rust type of their own). It must not contain behaviour or list routes;
//! `tests/it/openapi.rs` calls every documented operation to check it is served as
//! documented.

use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, RefOr, Response};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::auth::routes::{SignedIn, UserView};
use crate::billing::Entitlement;
use crate::config::PlanLimits;
use crate::error::Problem;
use crate::jobs::queue::JobView;

/// The served document: [`base_doc`] with the paths (and the schemas they use) of every
/// route the router serves with `routes!`, plus `/metrics` of the metrics listener, and
/// problem bodies on every error response.
pub fn api_doc() -> Document {
    let mut doc = crate::http::api_routes().into_openapi();
    doc.merge(crate::ops::metrics_routes().into_openapi());
    ProblemBodies.modify(&mut doc);
    doc
}

/// What the document has apart from the paths: info, servers, security schemes, the
/// shared schemas, tags. [`crate::http::api_routes`] builds on it.
pub fn base_doc() -> Document {
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
    components(schemas(Problem, SignedIn, UserView, Entitlement, JobView, Plan)),
    modifiers(&SecuritySchemes),
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

// The body of `POST /api/v1/auth/oauth/exchange` (the handler reads its own copy).
#[derive(serde::Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExchangeBody {
    /// The one-time code from the callback redirect (60 s, single use).
    pub code: String,
}
