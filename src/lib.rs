//! warpbase: a self-hosted SaaS backend in one binary — accounts and OAuth2 login, Stripe
//! subscription billing, and a durable job queue with live progress, on one SQLite file.
//!
//! [`App`] is the whole server. `main.rs` builds it from the CLI; tests build the very
//! same App on port 0 with a temporary data dir.

pub mod auth;
pub mod billing;
pub mod cache;
pub mod cli;
mod cli_admin;
pub mod clock;
pub mod config;
pub mod error;
pub mod events;
pub mod http;
pub mod identity;
pub mod ids;
pub mod jobs;
pub mod logging;
pub mod mail;
pub mod openapi;
pub mod ops;
pub mod ratelimit;
pub mod secrets;
pub mod serve;
pub mod state;
pub mod storage;
pub mod web;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

pub use config::Config;
pub use state::AppState;

use clock::{SharedClock, SystemClock};
use storage::Storage;

/// How long shutdown waits for the write that gives unfinished jobs back.
const RELEASE_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What tests (or embedders) may change about how the App is built.
#[derive(Clone, Default)]
pub struct AppOptions {
    /// The clock rules read "now" from; the system clock by default.
    pub clock: Option<SharedClock>,
    /// Extra routes merged into the router (tests use it to provoke panics and errors).
    pub extra_routes: Option<axum::Router<AppState>>,
    /// Extra job kinds (tests register handlers that count their side effects).
    pub extra_kinds: Vec<jobs::KindSpec>,
    /// A fault injected into every Stripe event application (tests prove rollback).
    pub billing_fault: Option<Arc<dyn billing::ApplyFault>>,
}

/// A built, bound, not yet serving warpbase.
pub struct App {
    state: AppState,
    extra_routes: Option<axum::Router<AppState>>,
    listener: TcpListener,
    _lock: storage::InstanceLock,
    metrics_listener: Option<TcpListener>,
}

impl App {
    pub async fn build(config: Config) -> anyhow::Result<App> {
        App::build_with(config, AppOptions::default()).await
    }

    /// Creates the data dir, loads or generates secrets, opens the database (applying
    /// migrations) and binds the listener(s).
    pub async fn build_with(mut config: Config, opts: AppOptions) -> anyhow::Result<App> {
        // Also for configs built in code, which did not pass through `Config::load`.
        config.jobs.ensure_system_queue();
        let data_dir = config.data_dir.clone();
        secrets::create_private_dir(&data_dir)
            .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
        let lock = storage::InstanceLock::acquire(&data_dir).map_err(anyhow::Error::msg)?;
        config.check_stripe().map_err(anyhow::Error::msg)?;
        let (tightened, loose) = secrets::tighten_data_dir(&data_dir, storage::DB_FILE);
        for (path, old, new) in tightened {
            tracing::warn!(
                "{} was mode {old:o}, open to other users; changed it to {new:o}",
                path.display()
            );
        }
        for warning in loose {
            tracing::warn!("{warning}");
        }
        match secrets::clear_scratch(&data_dir.join("tmp")) {
            Ok(0) => {}
            Ok(n) => tracing::info!(entries = n, "cleared scratch files left by an earlier run"),
            Err(e) => tracing::warn!(error = %e, "cannot clear {}", data_dir.join("tmp").display()),
        }
        let jwt_secret = match &config.auth.jwt_secret {
            Some(s) if !s.is_empty() => s.expose().to_string(),
            _ => secrets::load_or_generate(&data_dir, "jwt.key", "")
                .with_context(|| format!("cannot write secrets into {}", data_dir.display()))?,
        };
        let storage = {
            let dir = data_dir.clone();
            tokio::task::spawn_blocking(move || Storage::open(&dir))
                .await
                .context("storage open panicked")?
                .with_context(|| format!("cannot open the database in {}", data_dir.display()))?
        };
        let clock: SharedClock = opts.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let config = Arc::new(config);
        let metrics = ops::Metrics::install();
        let oauth = auth::oauth::OAuthProviders::new(
            &crate::auth::oauth::OAuthConfigs::from_config(&config.auth.oauth),
            config.public_base(),
        )
        .context("invalid [auth.oauth] configuration")?;
        let webhook_secrets = billing::webhook_secrets(&config)
            .with_context(|| format!("cannot write secrets into {}", data_dir.display()))?;
        let billing = billing::Billing::with_apply_fault(
            &config,
            storage.clone(),
            clock.clone(),
            webhook_secrets,
            opts.billing_fault,
        )
        .context("cannot set up the Stripe client")?;
        let mut kinds = vec![mail::kind_spec(), billing::usage::kind_spec()];
        kinds.extend(opts.extra_kinds);
        let jobs = jobs::Jobs::new(&config, kinds, Arc::new(billing.clone()));
        let tasks = tokio_util::task::TaskTracker::new();
        let wake_mail = {
            let jobs = jobs.clone();
            mail::WakeMail::new(move || jobs.notify(mail::QUEUE))
        };
        let auth = auth::Auth::new(
            &config,
            storage.clone(),
            clock.clone(),
            jwt_secret.as_bytes(),
            oauth,
            tasks.clone(),
            wake_mail,
        );
        let state = AppState::new(
            config.clone(),
            storage,
            clock,
            auth,
            billing,
            jobs,
            metrics,
            tasks,
        );
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        // The fake Stripe delivers its webhooks to this very process, over loopback.
        if let Ok(addr) = listener.local_addr() {
            let host = if addr.ip().is_unspecified() {
                std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
            } else {
                addr
            };
            state.billing.set_self_url(format!("http://{host}"));
        }
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr} for metrics"))?,
            ),
            None => None,
        };
        Ok(App {
            state,
            extra_routes: opts.extra_routes,
            listener,
            _lock: lock,
            metrics_listener,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| self.state.config.listen)
    }

    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves (or `state.shutdown` is cancelled), then drains:
    /// stops accepting, lets requests and jobs in flight finish within
    /// `shutdown_grace`, stops background tasks and checkpoints the WAL.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let App {
            state,
            extra_routes,
            listener,
            metrics_listener,
            _lock,
        } = self;
        let grace = state.config.shutdown_grace;
        let token = state.shutdown.clone();
        let addr = listener.local_addr()?;

        jobs::worker::start(&state);
        events::guard::start(&state);
        ops::backup::start(&state);
        ops::periodic::start(&state);
        state
            .tasks
            .spawn(state.auth.clone().watch_epoch(state.shutdown.clone()));
        let router = http::router(state.clone(), extra_routes);
        let stop = token.clone();
        let server = tokio::spawn(serve::serve(
            listener,
            router,
            serve::ConnLimits::from_config(&state.config),
            stop,
        ));
        let metrics_server = metrics_listener.map(|l| {
            let stop = token.clone();
            tokio::spawn(
                axum::serve(l, ops::metrics_router(state.clone()))
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .into_future(),
            )
        });
        state.set_ready(true);
        // Logged only once ready: tests and operators wait for this line.
        tracing::info!(
            "warpbase listening on http://{addr} (public URL {}, data in {}, {} mode)",
            state.config.public_url,
            state.config.data_dir.display(),
            if state.config.stripe.offline() {
                "offline"
            } else {
                "stripe"
            },
        );
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        // After the "listening" line, which tests and scripts wait for.
        match state.auth.prepare_admin_setup().await {
            Ok(Some(token)) => tracing::warn!(
                setup_token = %token,
                "no admin account yet. Sign in (or register) and claim admin with this one-time \
                 token: curl -X POST {}/api/v1/admin/claim -H 'authorization: Bearer <access \
                 token>' -H 'content-type: application/json' -d '{{\"token\":\"{token}\"}}'. \
                 Or run `warpbase user create EMAIL --admin` or `warpbase user promote EMAIL`. \
                 A restart replaces the token",
                state.config.public_base()
            ),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot prepare the admin setup token"),
        }

        tokio::select! {
            _ = shutdown => {}
            _ = token.cancelled() => {}
        }
        tracing::info!("shutting down: draining requests and jobs");
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        state.set_ready(false);
        token.cancel();

        let deadline = tokio::time::Instant::now() + grace;
        match tokio::time::timeout_at(deadline, server).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
            Err(_) => tracing::warn!("requests still running after the grace period; closing them"),
        }
        if let Some(m) = metrics_server {
            m.abort();
        }
        state.tasks.close();
        if tokio::time::timeout_at(deadline, state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks still running after the grace period");
            // Attempts that did not finish in time go back to the queue without spending
            // an attempt; their late outcomes are fenced off by (status, attempt).
            if tokio::time::timeout(RELEASE_LIMIT, jobs::worker::release_running(&state))
                .await
                .is_err()
            {
                tracing::error!(
                    "giving back unfinished jobs timed out; the next start recovers them"
                );
            }
        }
        state
            .storage
            .close()
            .await
            .context("closing the database")?;
        tracing::info!("stopped cleanly");
        Ok(())
    }

    /// Serves in a background task; for tests and embedding.
    pub fn spawn(self) -> RunningApp {
        let addr = self.local_addr();
        let metrics_addr = self.metrics_addr();
        let state = self.state.clone();
        let handle = tokio::spawn(self.serve(std::future::pending()));
        RunningApp {
            addr,
            metrics_addr,
            state,
            handle,
        }
    }
}

/// A serving App started with [`App::spawn`].
pub struct RunningApp {
    pub addr: SocketAddr,
    /// Where `/metrics` is served when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub state: AppState,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Graceful shutdown, as on SIGTERM; returns the server's result.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.state.shutdown.cancel();
        self.handle.await.context("server task panicked")?
    }
}

/// Resolves on SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled, so a signal right after startup is never missed.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                (t, i) => {
                    tracing::error!(
                        term = t.is_ok(),
                        int = i.is_ok(),
                        "cannot install signal handlers"
                    );
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
