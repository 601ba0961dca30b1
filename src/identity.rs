//! Who is calling: the authenticated caller as every layer may name it. The auth service
//! produces these values (from an access token or a session); jobs, billing and the edge
//! only read them, so they live in the base layer and name nothing above it.

/// The authenticated caller, as the extractors and services see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub user_id: String,
    pub session_id: String,
    pub is_admin: bool,
}

/// A checked access token as an SSE stream keeps it: the stream stays tied to this
/// session and token version and ends when the token expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub principal: Principal,
    pub token_version: i64,
    /// When the access token expires, in seconds since the epoch.
    pub expires_at: i64,
}
