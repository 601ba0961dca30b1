//! Configuration: defaults → `warpbase.toml` (or `--config`) → `WARPBASE_*` env → CLI flags.
//!
//! Every struct denies unknown fields, so a typo stops the start with the key named.
//! Secrets are wrapped in [`Secret`], whose `Debug` and `Serialize` never show the value.
//! Env: `WARPBASE_<KEY>` for top-level keys, `WARPBASE_<SECTION>__<KEY>` for sections;
//! `WARPBASE_..._FILE=/path` reads the value from a file (for systemd credentials).

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The default config file looked up in the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "warpbase.toml";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub listen: SocketAddr,
    /// What browsers and Stripe see (e.g. a tunnel URL); used for redirects and links.
    pub public_url: String,
    pub data_dir: PathBuf,
    /// CIDRs whose `X-Forwarded-For` is believed.
    #[serde(deserialize_with = "de_list")]
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub log_format: LogFormat,
    /// `tracing` env-filter syntax, e.g. `info` or `warpbase=debug,tower_http=info`.
    pub log_level: String,
    /// Where `/metrics` is served: its own listener, loopback by default, never the main
    /// one (which is often public). `"off"` (or `""`) serves no metrics at all.
    #[serde(with = "metrics_addr")]
    pub metrics_listen: Option<SocketAddr>,
    /// Largest JSON request body.
    pub max_json_bytes: usize,
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// A connection must deliver a request's whole head within this (slow-header guard).
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// A connection with no bytes read or written for this long is closed (idle keep-alive,
    /// stalled bodies). 0 disables.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// Open connections allowed per peer address; `trusted_proxies` are exempt. 0 = no cap.
    pub max_connections_per_ip: u32,
    /// Largest request head (sum of header names and values); larger is 431.
    pub max_header_bytes: usize,
    /// How long shutdown waits for requests and jobs in flight.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// `/readyz` answers 503 while the data dir's file system has less free space; 0: off.
    pub min_free_bytes: u64,
    pub auth: AuthConfig,
    pub mail: MailConfig,
    pub stripe: StripeConfig,
    pub billing: BillingConfig,
    pub jobs: JobsConfig,
    pub uploads: UploadsConfig,
    pub backup: BackupConfig,
    pub retention: RetentionConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: "http://127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./data"),
            trusted_proxies: Vec::new(),
            log_format: LogFormat::Auto,
            log_level: "info".into(),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            max_json_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections_per_ip: 256,
            max_header_bytes: 32 * 1024,
            shutdown_grace: Duration::from_secs(20),
            min_free_bytes: 64 * 1024 * 1024,
            auth: AuthConfig::default(),
            mail: MailConfig::default(),
            stripe: StripeConfig::default(),
            billing: BillingConfig::default(),
            jobs: JobsConfig::default(),
            uploads: UploadsConfig::default(),
            backup: BackupConfig::default(),
            retention: RetentionConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Pretty on a terminal, plain text otherwise.
    #[default]
    Auto,
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    #[serde(with = "duration")]
    pub access_ttl: Duration,
    #[serde(with = "duration")]
    pub refresh_ttl: Duration,
    /// Grace in which a just-rotated refresh token returns the current successor. 0 = strict.
    #[serde(with = "duration")]
    pub refresh_reuse_window: Duration,
    /// HS256 key for access tokens; generated into `data_dir` when unset.
    pub jwt_secret: Option<Secret>,
    /// Requests to the unauthenticated auth routes allowed per client IP in `rate_window`.
    pub rate_limit: u32,
    #[serde(with = "duration")]
    pub rate_window: Duration,
    /// How recent a session's sign-in must be to set a first password on an account that
    /// has none (an OAuth-only account).
    #[serde(with = "duration")]
    pub step_up_window: Duration,
    /// Failed sign-ins per (email, client network) after which the next attempt waits.
    pub lockout_free_failures: u32,
    /// The first such wait; doubles with each further failure. 0 disables the backoff.
    #[serde(with = "duration")]
    pub lockout_delay: Duration,
    #[serde(with = "duration")]
    pub lockout_max_delay: Duration,
    /// At most one verification or reset mail per address in this interval.
    #[serde(with = "duration")]
    pub mail_interval: Duration,
    pub oauth: OAuthConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            access_ttl: Duration::from_secs(15 * 60),
            refresh_ttl: Duration::from_secs(7 * 24 * 3600),
            refresh_reuse_window: Duration::ZERO,
            jwt_secret: None,
            rate_limit: 10,
            rate_window: Duration::from_secs(60),
            step_up_window: Duration::from_secs(600),
            lockout_free_failures: 5,
            lockout_delay: Duration::from_secs(1),
            lockout_max_delay: Duration::from_secs(15 * 60),
            mail_interval: Duration::from_secs(5 * 60),
            oauth: OAuthConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthConfig {
    pub github: Option<OAuthProviderConfig>,
    pub google: Option<OAuthProviderConfig>,
    pub oidc: Option<OAuthProviderConfig>,
}

/// One OAuth provider. Which fields matter depends on the provider: GitHub uses the
/// URLs (defaults are GitHub's), Google and generic OIDC use `issuer` (discovery).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OAuthProviderConfig {
    pub client_id: String,
    pub client_secret: Secret,
    pub name: Option<String>,
    pub issuer: Option<String>,
    pub auth_url: Option<String>,
    pub token_url: Option<String>,
    pub api_url: Option<String>,
    /// Google only: where its signing keys are published (default Google's; for tests).
    pub jwks_url: Option<String>,
    #[serde(deserialize_with = "de_list")]
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MailConfig {
    /// `smtp://user:pass@host:587` or `smtps://...`; empty: mails are written to the log.
    pub smtp_url: Secret,
    pub from: String,
}

impl Default for MailConfig {
    fn default() -> Self {
        MailConfig {
            smtp_url: Secret::default(),
            from: "warpbase@localhost".into(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StripeConfig {
    /// Empty: offline mode with the built-in fake Stripe.
    pub secret_key: Secret,
    /// Accepted webhook signing secrets (several during rotation).
    #[serde(deserialize_with = "de_secret_list")]
    pub webhook_secrets: Vec<Secret>,
    /// Point the client at a Stripe-compatible server (stripe-mock, localstripe).
    pub api_base: String,
}

impl StripeConfig {
    pub fn offline(&self) -> bool {
        self.secret_key.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    pub grace_days: u32,
    pub plans: Vec<PlanConfig>,
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            grace_days: 3,
            plans: vec![PlanConfig {
                id: "pro".into(),
                name: "Pro".into(),
                price_id: "price_pro_monthly".into(),
                price: 1900,
                currency: "usd".into(),
                interval: "month".into(),
                metered: false,
                limits: PlanLimits {
                    jobs_per_period: 1000,
                    concurrent_jobs: 4,
                    max_upload_bytes: 50 * 1024 * 1024,
                    max_storage_bytes: 5 * 1024 * 1024 * 1024,
                },
            }],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub price_id: String,
    #[serde(default)]
    pub price: u64,
    #[serde(default = "default_currency")]
    pub currency: String,
    #[serde(default = "default_interval")]
    pub interval: String,
    #[serde(default)]
    pub metered: bool,
    pub limits: PlanLimits,
}

fn default_currency() -> String {
    "usd".into()
}
fn default_interval() -> String {
    "month".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(from = "RawPlanLimits")]
pub struct PlanLimits {
    pub jobs_per_period: u64,
    pub concurrent_jobs: u32,
    pub max_upload_bytes: u64,
    /// All of a user's stored uploads together; without the key in a plan,
    /// [`STORAGE_PER_UPLOAD`] times `max_upload_bytes`.
    pub max_storage_bytes: u64,
}

/// A plan's storage quota when its config names none, in largest uploads.
pub const STORAGE_PER_UPLOAD: u64 = 10;

/// [`PlanLimits`] as written in the config, where `max_storage_bytes` may be left out
/// (configs written before it existed).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlanLimits {
    jobs_per_period: u64,
    concurrent_jobs: u32,
    max_upload_bytes: u64,
    max_storage_bytes: Option<u64>,
}

impl From<RawPlanLimits> for PlanLimits {
    fn from(r: RawPlanLimits) -> PlanLimits {
        PlanLimits {
            jobs_per_period: r.jobs_per_period,
            concurrent_jobs: r.concurrent_jobs,
            max_upload_bytes: r.max_upload_bytes,
            max_storage_bytes: r
                .max_storage_bytes
                .unwrap_or(r.max_upload_bytes.saturating_mul(STORAGE_PER_UPLOAD)),
        }
    }
}

impl PlanLimits {
    /// The limits of the built-in `free` plan unless the config redefines `free`.
    pub const FREE: PlanLimits = PlanLimits {
        jobs_per_period: 100,
        concurrent_jobs: 2,
        max_upload_bytes: 5 * 1024 * 1024,
        max_storage_bytes: 50 * 1024 * 1024,
    };
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    #[serde(with = "duration")]
    pub backoff_base: Duration,
    #[serde(with = "duration")]
    pub backoff_cap: Duration,
    pub max_attempts: u32,
    /// How long a claimed job is leased before the rescuer may re-queue it.
    #[serde(with = "duration")]
    pub lease: Duration,
    /// Finished jobs older than this are purged.
    #[serde(with = "duration")]
    pub retention: Duration,
    pub queues: BTreeMap<String, QueueConfig>,
    pub kinds: BTreeMap<String, KindConfig>,
}

impl Default for JobsConfig {
    fn default() -> Self {
        let mut queues = BTreeMap::new();
        queues.insert(
            "fast".to_string(),
            QueueConfig {
                concurrency: 8,
                timeout: Duration::from_secs(10),
            },
        );
        queues.insert(
            "slow".to_string(),
            QueueConfig {
                concurrency: 2,
                timeout: Duration::from_secs(600),
            },
        );
        queues.insert(SYSTEM_QUEUE.to_string(), QueueConfig::SYSTEM);
        JobsConfig {
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(600),
            max_attempts: 4,
            lease: Duration::from_secs(30),
            retention: Duration::from_secs(30 * 24 * 3600),
            queues,
            kinds: BTreeMap::new(),
        }
    }
}

/// The queue of internal kinds (mail, usage reports). Users cannot submit to it, so no
/// user backlog delays them; it always exists (with [`QueueConfig::SYSTEM`] unless the
/// config defines it).
pub const SYSTEM_QUEUE: &str = "system";

impl JobsConfig {
    /// Adds the [`SYSTEM_QUEUE`] if the config's `[jobs.queues]` left it out (defining
    /// any queue replaces the default list).
    pub fn ensure_system_queue(&mut self) {
        self.queues
            .entry(SYSTEM_QUEUE.to_string())
            .or_insert(QueueConfig::SYSTEM);
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub concurrency: u32,
    #[serde(with = "duration")]
    pub timeout: Duration,
}

impl QueueConfig {
    /// The default [`SYSTEM_QUEUE`].
    pub const SYSTEM: QueueConfig = QueueConfig {
        concurrency: 2,
        timeout: Duration::from_secs(60),
    };
}

/// Uploads for the `analyze` kind (`data_dir/uploads`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadsConfig {
    /// An upload is deleted this long after it was stored, once no active job uses it.
    /// 0 keeps uploads until their owner deletes them.
    #[serde(with = "duration")]
    pub retention: Duration,
    /// Uploads each user may store per `rate_window`.
    pub rate_limit: u32,
    #[serde(with = "duration")]
    pub rate_window: Duration,
    /// Below this much free space on the uploads' filesystem, uploads are refused with
    /// 503 (the database needs room too).
    pub min_free_bytes: u64,
}

impl Default for UploadsConfig {
    fn default() -> Self {
        UploadsConfig {
            retention: Duration::from_secs(7 * 24 * 3600),
            rate_limit: 30,
            rate_window: Duration::from_secs(3600),
            min_free_bytes: 512 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KindConfig {
    /// Queue for this kind; built-in kinds have their own default.
    pub queue: Option<String>,
    /// Program and arguments run per job (no shell). Makes this a `command` kind.
    pub command: Vec<String>,
    #[serde(default, with = "duration::option")]
    pub timeout: Option<Duration>,
    pub max_attempts: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupConfig {
    /// Automatic backups into `data_dir/backups` every `interval`; 0 disables.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// How many automatic backups to keep.
    pub keep: u32,
}

impl Default for BackupConfig {
    fn default() -> Self {
        BackupConfig {
            interval: Duration::ZERO,
            keep: 7,
        }
    }
}

/// How long rows nobody needs any more are kept before the periodic task deletes them;
/// 0 keeps them forever. (Finished jobs: `jobs.retention`.)
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Sessions, counted from when they were revoked or their refresh token expired.
    #[serde(with = "duration")]
    pub sessions: Duration,
    /// Rotated refresh-token hashes (reuse detection), from their rotation. At least
    /// `auth.refresh_ttl`: an older rotated token has expired anyway.
    #[serde(with = "duration")]
    pub refresh_history: Duration,
    /// Security audit entries.
    #[serde(with = "duration")]
    pub audit_log: Duration,
    /// Processed Stripe events (applied, ignored, stale), from when they were processed.
    /// Failed events are kept until replayed. At least 7 days: Stripe redelivers for 3,
    /// and the recorded id is what makes a redelivery a no-op.
    #[serde(with = "duration")]
    pub stripe_events: Duration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        RetentionConfig {
            sessions: Duration::from_secs(30 * DAY),
            refresh_history: Duration::from_secs(30 * DAY),
            audit_log: Duration::from_secs(365 * DAY),
            stripe_events: Duration::from_secs(90 * DAY),
        }
    }
}

/// A secret string: `Debug`, `Display` and `Serialize` show `[redacted]` (or `""` if empty).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("\"\"")
        } else {
            f.write_str("[redacted]")
        }
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "[redacted]" })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Accepts a list, a JSON array in a string, or a comma-separated string (env values).
fn de_list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr + Deserialize<'de>,
    T::Err: fmt::Display,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString<T> {
        List(Vec<T>),
        Str(String),
    }
    match ListOrString::<T>::deserialize(d)? {
        ListOrString::List(v) => Ok(v),
        ListOrString::Str(s) => split_list(&s)
            .into_iter()
            .map(|item| item.parse::<T>().map_err(serde::de::Error::custom))
            .collect(),
    }
}

fn de_secret_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum ListOrString {
        List(Vec<String>),
        Str(String),
    }
    Ok(match ListOrString::deserialize(d)? {
        ListOrString::List(v) => v,
        ListOrString::Str(s) => split_list(&s),
    }
    .into_iter()
    .map(Secret)
    .collect())
}

fn split_list(s: &str) -> Vec<String> {
    let t = s.trim();
    if t.starts_with('[')
        && let Ok(v) = serde_json::from_str::<Vec<String>>(t)
    {
        return v;
    }
    t.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(String::from)
        .collect()
}

/// `metrics_listen`: an address, or `"off"`/`""` for none (so env and TOML can turn the
/// listener off explicitly; a missing key keeps the default).
mod metrics_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(a: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match a {
            Some(a) => s.serialize_str(&a.to_string()),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        match text.trim() {
            "" | "off" => Ok(None),
            t => t.parse().map(Some).map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid address {t:?}: {e} (try \"127.0.0.1:9090\", or \"off\")"
                ))
            }),
        }
    }
}

/// Durations as humantime text (`"15m"`, `"7d"`, `"250ms"`) or integer seconds.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }

    fn parse(raw: Raw) -> Result<Duration, String> {
        match raw {
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => {
                let t = t.trim();
                if t == "0" {
                    return Ok(Duration::ZERO);
                }
                humantime::parse_duration(t).map_err(|e| {
                    format!("invalid duration {t:?}: {e} (try \"30s\", \"15m\", \"7d\")")
                })
            }
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse(Raw::deserialize(d)?).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<super::Raw>::deserialize(d)?
                .map(super::parse)
                .transpose()
                .map_err(serde::de::Error::custom)
        }
    }
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads the layered configuration. `file`: an explicit `--config`, which must exist;
    /// without it `./warpbase.toml` is read if present.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_from(file, overrides, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_from(
        file: Option<&Path>,
        overrides: &Overrides,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut fig = Figment::new();
        match file {
            Some(path) if !path.exists() => return Err(ConfigError::MissingFile(path.into())),
            Some(path) => fig = fig.merge(Toml::file_exact(path)),
            None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
                fig = fig.merge(Toml::file_exact(DEFAULT_CONFIG_FILE))
            }
            None => {}
        }
        let env = resolve_env(env)?;
        // figment's Env reads the process environment; we feed our resolved copy instead.
        let mut dict = figment::value::Dict::new();
        for (key, value) in env {
            insert_path(&mut dict, &key, value);
        }
        fig = fig.merge(Serialized::defaults(dict));
        fig = fig.merge(Serialized::defaults(overrides));
        let mut config: Config = fig
            .extract()
            .map_err(|e| ConfigError::Invalid(describe_figment_error(e)))?;
        config.jobs.ensure_system_queue();
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !(self.public_url.starts_with("http://") || self.public_url.starts_with("https://")) {
            return bad(format!(
                "public_url must start with http:// or https://, got {:?}",
                self.public_url
            ));
        }
        if self.jobs.queues.is_empty() {
            return bad("jobs.queues must define at least one queue".into());
        }
        for (name, q) in &self.jobs.queues {
            if q.concurrency == 0 {
                return bad(format!("jobs.queues.{name}.concurrency must be at least 1"));
            }
        }
        for (name, k) in &self.jobs.kinds {
            if let Some(q) = &k.queue
                && !self.jobs.queues.contains_key(q)
            {
                return bad(format!("jobs.kinds.{name}.queue names unknown queue {q:?}"));
            }
        }
        if self.jobs.max_attempts == 0 {
            return bad("jobs.max_attempts must be at least 1".into());
        }
        if !self.backup.interval.is_zero() && self.backup.keep == 0 {
            return bad("backup.keep must be at least 1 when backup.interval is set".into());
        }
        self.check_stripe().map_err(ConfigError::Invalid)?;
        if let Some(m) = self.metrics_listen
            && m.port() != 0
            && m == self.listen
        {
            return bad(format!(
                "metrics_listen ({m}) must differ from listen: metrics get a listener of \
                 their own (\"off\" disables them)"
            ));
        }
        let r = &self.retention;
        if !r.refresh_history.is_zero() && r.refresh_history < self.auth.refresh_ttl {
            return bad(format!(
                "retention.refresh_history ({}) must be 0 or at least auth.refresh_ttl ({}): \
                 reuse of a rotated token must stay detectable while it could still be valid",
                humantime::format_duration(r.refresh_history),
                humantime::format_duration(self.auth.refresh_ttl)
            ));
        }
        if !r.stripe_events.is_zero() && r.stripe_events < Duration::from_secs(7 * 24 * 3600) {
            return bad(
                "retention.stripe_events must be 0 or at least 7d: Stripe redelivers events \
                 for 3 days and a recorded id is what makes a redelivery a no-op"
                    .into(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for p in &self.billing.plans {
            if !seen.insert(p.id.as_str()) {
                return bad(format!("billing.plans: plan id {:?} appears twice", p.id));
            }
        }
        Ok(())
    }

    /// Stripe mode needs a webhook secret: without one no delivery could ever verify, and
    /// every subscription would silently stay unpaid. Also checked by `App::build`, for
    /// configs not made by [`Config::load`].
    pub fn check_stripe(&self) -> Result<(), String> {
        if !self.stripe.offline() && self.stripe.webhook_secrets.iter().all(Secret::is_empty) {
            return Err(
                "stripe.webhook_secrets is empty but stripe.secret_key is set: no webhook from \
                 Stripe could ever be verified; add the endpoint's signing secret (whsec_...) \
                 from the Stripe dashboard or `stripe listen`"
                    .into(),
            );
        }
        Ok(())
    }

    /// The public URL without a trailing slash.
    pub fn public_base(&self) -> &str {
        self.public_url.trim_end_matches('/')
    }

    /// The effective plans: `free` first (the configured one or the built-in default).
    pub fn plans(&self) -> Vec<PlanConfig> {
        let mut plans = Vec::with_capacity(self.billing.plans.len() + 1);
        match self.billing.plans.iter().find(|p| p.id == "free") {
            Some(free) => plans.push(free.clone()),
            None => plans.push(PlanConfig {
                id: "free".into(),
                name: "Free".into(),
                price_id: String::new(),
                price: 0,
                currency: "usd".into(),
                interval: "month".into(),
                metered: false,
                limits: PlanLimits::FREE,
            }),
        }
        plans.extend(
            self.billing
                .plans
                .iter()
                .filter(|p| p.id != "free")
                .cloned(),
        );
        plans
    }

    /// TOML text of the effective configuration with secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Reads `WARPBASE_*` variables into (dotted lowercase key, value), resolving `*_FILE`.
fn resolve_env(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, String)>, ConfigError> {
    let mut out = Vec::new();
    for (key, value) in env {
        let Some(rest) = key.strip_prefix("WARPBASE_") else {
            continue;
        };
        // Variables the CLI reads itself, not config keys.
        if rest == "CONFIG" || rest.is_empty() {
            continue;
        }
        let (rest, value) = match rest.strip_suffix("_FILE") {
            Some(base) => {
                let text = std::fs::read_to_string(&value).map_err(|source| ConfigError::Read {
                    path: value.clone(),
                    source,
                })?;
                (base, text.trim_end_matches(['\r', '\n']).to_string())
            }
            None => (rest, value),
        };
        let dotted = rest
            .split("__")
            .map(|s| s.to_ascii_lowercase())
            .collect::<Vec<_>>()
            .join(".");
        out.push((dotted, value));
    }
    Ok(out)
}

/// Inserts `value` at a dotted path, parsing it like figment's Env does (numbers, bools).
fn insert_path(dict: &mut figment::value::Dict, dotted: &str, value: String) {
    use figment::value::Value;
    let mut parts = dotted.split('.').peekable();
    let mut cur = dict;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            let parsed: Value = value.parse().unwrap_or_else(|_| Value::from(value.clone()));
            // Keep strings that only look like lists or numbers as text where it matters:
            // de_list and de_secret_list accept text, and secrets must never be reparsed.
            let parsed = match parsed {
                Value::Array(..) | Value::Dict(..) => Value::from(value),
                v => v,
            };
            cur.insert(part.to_string(), parsed);
            return;
        }
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| Value::from(figment::value::Dict::new()));
        if !matches!(entry, Value::Dict(..)) {
            *entry = Value::from(figment::value::Dict::new());
        }
        match entry {
            Value::Dict(_, d) => cur = d,
            _ => return,
        }
    }
}

fn describe_figment_error(e: figment::Error) -> String {
    e.into_iter()
        .map(|e| {
            let path = e.path.join(".");
            let origin = e
                .metadata
                .as_ref()
                .map(|m| m.name.to_string())
                .unwrap_or_default();
            let mut msg = e.kind.to_string();
            if !path.is_empty() {
                msg = format!("{path}: {msg}");
            }
            if !origin.is_empty() {
                msg = format!("{msg} (from {origin})");
            }
            msg
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(toml: Option<&str>, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w.toml");
        if let Some(t) = toml {
            std::fs::write(&path, t).expect("write");
        }
        Config::load_from(
            toml.map(|_| path.as_path()),
            &Overrides::default(),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn oauth_sections_map_to_providers_and_need_a_client_id() {
        let c = load(
            Some(
                "[auth.oauth.github]\nclient_id = \"gh\"\nclient_secret = \"s\"\n\
                 api_url = \"http://127.0.0.1:9/api\"\n\
                 [auth.oauth.google]\nclient_secret = \"s\"\n\
                 [auth.oauth.oidc]\nclient_id = \"o\"\nclient_secret = \"s\"\n\
                 issuer = \"https://sso.example\"\nname = \"Corp SSO\"\n",
            ),
            &[],
        )
        .expect("loads");
        let p = crate::auth::oauth::OAuthConfigs::from_config(&c.auth.oauth);
        let gh = p.github.expect("github enabled");
        assert_eq!(gh.client_id, "gh");
        assert_eq!(gh.client_secret, "s");
        assert_eq!(gh.api_url, "http://127.0.0.1:9/api");
        assert_eq!(
            gh.auth_url, "https://github.com/login/oauth/authorize",
            "default kept"
        );
        assert!(p.google.is_none(), "no client_id: disabled");
        let oidc = p.oidc.expect("oidc enabled");
        assert_eq!(oidc.issuer, "https://sso.example");
        assert_eq!(oidc.name, "Corp SSO");
        assert_eq!(oidc.scopes, ["openid", "email", "profile"]);
        let providers = crate::auth::oauth::OAuthProviders::new(
            &crate::auth::oauth::OAuthConfigs::from_config(&c.auth.oauth),
            c.public_base(),
        )
        .expect("valid");
        let ids: Vec<_> = providers.enabled().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["github", "oidc"]);
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = load(None, &[]).expect("defaults load");
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.auth.access_ttl, Duration::from_secs(900));
        assert_eq!(c.auth.refresh_ttl, Duration::from_secs(604_800));
        assert_eq!(c.jobs.max_attempts, 4);
        assert!(c.stripe.offline());
        assert_eq!(c.plans()[0].id, "free");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load(Some("listen = \"127.0.0.1:1\"\nlisten_adress = 1\n"), &[])
            .expect_err("typo must fail");
        assert!(err.to_string().contains("listen_adress"), "{err}");
        let err = load(Some("[stripe]\nsecret = \"x\"\n"), &[]).expect_err("typo must fail");
        assert!(err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn env_overrides_file_and_lists_parse() {
        let c = load(
            Some("public_url = \"http://a\"\n[jobs]\nbackoff_base = \"2s\"\n"),
            &[
                ("WARPBASE_PUBLIC_URL", "https://tunnel.example"),
                ("WARPBASE_STRIPE__WEBHOOK_SECRETS", "whsec_a,whsec_b"),
                (
                    "WARPBASE_TRUSTED_PROXIES",
                    "[\"10.0.0.0/8\",\"127.0.0.1/32\"]",
                ),
                ("WARPBASE_JOBS__BACKOFF_CAP", "5m"),
                ("WARPBASE_BILLING__GRACE_DAYS", "5"),
            ],
        )
        .expect("load");
        assert_eq!(c.public_url, "https://tunnel.example");
        assert_eq!(c.stripe.webhook_secrets.len(), 2);
        assert_eq!(c.stripe.webhook_secrets[1].expose(), "whsec_b");
        assert_eq!(c.trusted_proxies.len(), 2);
        assert_eq!(c.jobs.backoff_base, Duration::from_secs(2));
        assert_eq!(c.jobs.backoff_cap, Duration::from_secs(300));
        assert_eq!(c.billing.grace_days, 5);
    }

    #[test]
    fn secret_from_file_and_redaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = dir.path().join("key");
        std::fs::write(&f, "sk_test_123\n").expect("write");
        let c = load(
            None,
            &[
                (
                    "WARPBASE_STRIPE__SECRET_KEY_FILE",
                    f.to_str().expect("utf8"),
                ),
                // Stripe mode is only valid with a webhook secret.
                ("WARPBASE_STRIPE__WEBHOOK_SECRETS", "whsec_test"),
            ],
        )
        .expect("load");
        assert_eq!(c.stripe.secret_key.expose(), "sk_test_123");
        assert!(!format!("{c:?}").contains("sk_test_123"));
        assert!(!c.to_redacted_toml().contains("sk_test_123"));
    }

    #[test]
    fn bad_values_are_explained() {
        let err = load(None, &[("WARPBASE_JOBS__BACKOFF_BASE", "soon")]).expect_err("bad");
        assert!(err.to_string().contains("backoff_base"), "{err}");
        let err = load(Some("[jobs.kinds.x]\nqueue = \"nope\"\n"), &[]).expect_err("bad");
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
