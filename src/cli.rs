//! The command line: `warpbase [serve]`, `migrate`, `backup`, `restore`, `user`, `config`,
//! `version`. Global flags work before or after the subcommand.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};

use crate::auth::AuthError;
use crate::config::{Config, LogFormat, Overrides};
use crate::storage::{self, Storage};

#[derive(Debug, Parser)]
#[command(
    name = "warpbase",
    version,
    about = "A self-hosted SaaS backend in one binary"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Args, Clone, Default)]
pub struct GlobalArgs {
    /// Config file (default: ./warpbase.toml if present).
    #[arg(long, global = true, env = "WARPBASE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (database, generated secrets, uploads).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:8080 (port 0 picks a free port).
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// Log format.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormatArg {
    Pretty,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Copy the live database into PATH (consistent, safe while the server runs).
    Backup {
        path: PathBuf,
        /// Replace PATH if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Replace the database with the backup at PATH (server stopped; integrity-checked first).
    Restore {
        path: PathBuf,
        /// Replace an existing database.
        #[arg(long)]
        force: bool,
    },
    /// Manage users.
    #[command(subcommand)]
    User(UserCommand),
    /// Inspect the configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// The dead-letter queue of jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Stripe: offline event triggers and reconciliation.
    #[command(subcommand)]
    Stripe(StripeCommand),
    /// Print the version.
    Version,
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Create a user. Without `--password-stdin` the account has no password: the user
    /// signs in with OAuth or sets one through password reset.
    Create {
        email: String,
        /// Make the user an admin.
        #[arg(long)]
        admin: bool,
        /// Read the password from the first line of standard input (never from the
        /// command line, where other local users could see it in the process list).
        #[arg(long)]
        password_stdin: bool,
    },
    /// List users.
    List,
    /// Make a user an admin.
    Promote { email: String },
    /// Disable a user: every session and token stops working.
    Disable { email: String },
    /// Re-enable a disabled user.
    Enable { email: String },
}

#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List dead jobs, or retry / discard one.
    Dead {
        /// Put this dead job back in the queue with a fresh budget of attempts.
        #[arg(long, value_name = "ID", conflicts_with = "discard")]
        retry: Option<String>,
        /// Delete this dead job.
        #[arg(long, value_name = "ID")]
        discard: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum StripeCommand {
    /// Offline mode: make the fake Stripe send an event for a user's subscription through
    /// the running server's webhook (signed like Stripe does).
    Trigger {
        /// invoice.paid (a renewal), invoice.payment_failed, customer.subscription.deleted,
        /// customer.subscription.updated (schedule cancel at period end), or resume.
        event: String,
        #[arg(long)]
        email: String,
        /// Where the server listens (default: public_url).
        #[arg(long, value_name = "URL")]
        url: Option<String>,
    },
    /// Fetch every customer's subscriptions from Stripe and repair local state.
    Sync,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration and exit 0 if it is usable.
    Check,
    /// Print the effective configuration (secrets redacted).
    Print,
}

/// Entry point used by `main.rs`.
pub fn main() -> ExitCode {
    // Everything warpbase writes (database, WAL, backups, secrets, uploads) is private
    // to its user, whatever umask it was started with.
    #[cfg(unix)]
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe {
        libc::umask(0o077);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(g: &GlobalArgs) -> anyhow::Result<Config> {
    let overrides = Overrides {
        data_dir: g.data_dir.clone(),
        listen: g.listen,
        log_format: g.log_format.map(|f| match f {
            LogFormatArg::Pretty => LogFormat::Pretty,
            LogFormatArg::Json => LogFormat::Json,
        }),
    };
    Ok(Config::load(g.config.as_deref(), &overrides)?)
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let command = cli.command.unwrap_or(Command::Serve);
    if let Command::Version = command {
        println!("warpbase {}", env!("CARGO_PKG_VERSION"));
        return Ok(ExitCode::SUCCESS);
    }
    let config = load_config(&cli.global)?;
    match command {
        Command::Serve => {
            crate::logging::init(config.log_format, &config.log_level);
            serve(config)?;
        }
        Command::Migrate => {
            let db = config.data_dir.join(storage::DB_FILE);
            crate::secrets::create_private_dir(&config.data_dir)?;
            let _lock = storage::InstanceLock::acquire(&config.data_dir)
                .map_err(|e| anyhow!("{e} (a running server applies migrations itself)"))?;
            let mut conn = storage::open_writer_conn(&db)?;
            let ran = storage::migrate::apply(&mut conn)?;
            println!(
                "database {} at schema version {} ({ran} migration(s) applied)",
                db.display(),
                storage::migrate::current_version(&conn)?
            );
        }
        Command::Backup { path, force } => backup(&config, &path, force)?,
        Command::Restore { path, force } => restore(&config, &path, force)?,
        Command::User(cmd) => user(&config, cmd)?,
        Command::Jobs(JobsCommand::Dead { retry, discard }) => {
            crate::cli_admin::jobs_dead(&config, retry, discard)?
        }
        Command::Stripe(StripeCommand::Trigger { event, email, url }) => {
            crate::cli_admin::stripe_trigger(&config, &event, &email, url)?
        }
        Command::Stripe(StripeCommand::Sync) => crate::cli_admin::stripe_sync(&config)?,
        Command::Config(ConfigCommand::Check) => {
            // The OAuth providers validate their URLs and secrets when built.
            crate::auth::oauth::OAuthProviders::new(
                &crate::auth::oauth::OAuthConfigs::from_config(&config.auth.oauth),
                config.public_base(),
            )
            .context("invalid [auth.oauth] configuration")?;
            println!(
                "configuration ok (listen {}, data_dir {}, {} mode)",
                config.listen,
                config.data_dir.display(),
                if config.stripe.offline() {
                    "offline"
                } else {
                    "stripe"
                }
            );
        }
        Command::Config(ConfigCommand::Print) => print!("{}", config.to_redacted_toml()),
        Command::Version => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let shutdown = crate::shutdown_signal();
        let app = crate::App::build(config).await?;
        if let Some(m) = app.metrics_addr() {
            tracing::info!("metrics on http://{m}/metrics");
        }
        app.serve(shutdown).await
    })
}

fn backup(config: &Config, dest: &Path, force: bool) -> anyhow::Result<()> {
    let src = config.data_dir.join(storage::DB_FILE);
    if !src.exists() {
        bail!("no database at {}", src.display());
    }
    if dest.exists() && !force {
        bail!("{} exists; pass --force to replace it", dest.display());
    }
    // Write next to the destination and rename, so a failed backup never leaves a
    // half-written file under the final name (and a forced one keeps the old file until
    // the new one is complete).
    let tmp = sibling(dest, ".partial");
    let _ = std::fs::remove_file(&tmp);
    let result = storage::backup_file(&src, &tmp)
        .with_context(|| format!("backup of {} failed", src.display()))
        .and_then(|()| {
            storage::integrity_check(&tmp).context("the backup failed its integrity check")
        })
        .and_then(|()| {
            std::fs::rename(&tmp, dest)
                .with_context(|| format!("cannot move the backup to {}", dest.display()))
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_parent(dest);
    println!("backed up {} to {}", src.display(), dest.display());
    Ok(())
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// Makes a rename durable (best effort: not every filesystem allows syncing a directory).
fn sync_parent(path: &Path) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if let Ok(d) = std::fs::File::open(parent) {
        let _ = d.sync_all();
    }
}

fn restore(config: &Config, backup: &Path, force: bool) -> anyhow::Result<()> {
    if !backup.is_file() {
        bail!("no backup file at {}", backup.display());
    }
    storage::integrity_check(backup)
        .with_context(|| format!("{} is not a healthy SQLite database", backup.display()))?;
    {
        let version = storage::schema_version_of(backup)?;
        if version > storage::migrate::latest_version() {
            bail!(
                "the backup has schema version {version}, newer than this binary knows ({}); \
                 restore it with a newer warpbase",
                storage::migrate::latest_version()
            );
        }
    }
    crate::secrets::create_private_dir(&config.data_dir)?;
    // Hold the instance lock for the whole restore: a running server would keep writing
    // into the file we replace, and one starting midway would see half a database.
    let _lock = storage::InstanceLock::acquire(&config.data_dir)
        .map_err(|e| anyhow!("{e}; stop the server before restoring"))?;
    let db = config.data_dir.join(storage::DB_FILE);
    let wal_files = ["-wal", "-shm"].map(|s| sibling(&db, s));
    let mut kept = None;
    if db.exists() {
        if !force {
            bail!(
                "{} exists; pass --force to replace it (it is kept as {}.pre-restore)",
                db.display(),
                storage::DB_FILE
            );
        }
        // Fold the old WAL into its file so the copy we keep is whole. The old database
        // may be the broken one we are restoring over, so failing here only warns: its
        // WAL then moves along with it below.
        if let Err(e) = storage::checkpoint_file(&db) {
            eprintln!("warning: cannot checkpoint the old database ({e}); replacing it anyway");
        }
        let old = sibling(&db, ".pre-restore");
        // A WAL of an earlier pre-restore copy must not pair up with this one.
        for stale in [sibling(&old, "-wal"), sibling(&old, "-shm")] {
            let _ = std::fs::remove_file(stale);
        }
        std::fs::rename(&db, &old)
            .with_context(|| format!("cannot move the old database to {}", old.display()))?;
        let wal = sibling(&db, "-wal");
        if wal.exists() {
            let old_wal = sibling(&old, "-wal");
            std::fs::rename(&wal, &old_wal)
                .with_context(|| format!("cannot move {} aside", wal.display()))?;
        }
        kept = Some(old);
    }
    // A WAL left from the old database must never be applied to the restored one.
    for f in &wal_files {
        match std::fs::remove_file(f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", f.display()));
            }
            _ => {}
        }
    }
    let tmp = sibling(&db, ".restoring");
    std::fs::copy(backup, &tmp)
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .with_context(|| format!("cannot copy {} to {}", backup.display(), tmp.display()))?;
    std::fs::rename(&tmp, &db).with_context(|| format!("cannot move into {}", db.display()))?;
    sync_parent(&db);
    let mut conn = storage::open_writer_conn(&db)?;
    let ran = storage::migrate::apply(&mut conn)?;
    println!(
        "restored {} into {} ({ran} migration(s) applied)",
        backup.display(),
        db.display()
    );
    if let Some(old) = kept {
        println!("the previous database is kept as {}", old.display());
    }
    Ok(())
}

fn user(config: &Config, cmd: UserCommand) -> anyhow::Result<()> {
    use crate::auth::operator::AccountChange;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let storage = {
            let dir = config.data_dir.clone();
            tokio::task::spawn_blocking(move || Storage::open(&dir)).await??
        };
        // The same account code as the HTTP flows (normalised address, password rules,
        // audit rows), without the server's OAuth, mail queue or signing key.
        let auth = crate::auth::Auth::for_operator(
            config,
            storage.clone(),
            std::sync::Arc::new(crate::clock::SystemClock),
        )?;
        let change = |email: String, change: AccountChange, done: &'static str| {
            let auth = auth.clone();
            async move {
                match auth.change_account(&email, change).await {
                    Ok(u) => {
                        println!("{} {done}", u.email);
                        Ok(())
                    }
                    Err(e) => Err(account_error(&email, e)),
                }
            }
        };
        let result = match cmd {
            UserCommand::Create {
                email,
                admin,
                password_stdin,
            } => {
                let password = if password_stdin {
                    Some(password_from_stdin().await?)
                } else {
                    None
                };
                match auth.create_account(&email, password, admin).await {
                    Ok(u) => {
                        println!("created {} {} ({})", u.role, u.email, u.id);
                        Ok(())
                    }
                    Err(e) => Err(account_error(&email, e)),
                }
            }
            UserCommand::List => {
                let users = storage
                    .read(|c| storage::users::list_users(c, None, 10_000))
                    .await?;
                println!("{:<34} {:<6} {:<9} EMAIL", "ID", "ROLE", "STATUS");
                for u in users {
                    println!(
                        "{:<34} {:<6} {:<9} {}",
                        u.id,
                        u.role,
                        if u.disabled { "disabled" } else { "active" },
                        u.email
                    );
                }
                Ok(())
            }
            UserCommand::Promote { email } => {
                change(email, AccountChange::Promote, "is now an admin").await
            }
            UserCommand::Disable { email } => {
                change(
                    email,
                    AccountChange::Disable,
                    "is disabled; its sessions and access tokens stop working \
                     (a running server applies this within a second)",
                )
                .await
            }
            UserCommand::Enable { email } => {
                change(email, AccountChange::Enable, "is enabled").await
            }
        };
        storage.close().await?;
        result
    })
}

/// What the operator is told when an account command is refused. The password was
/// checked when it was read, so an invalid input here is the address.
fn account_error(email: &str, e: AuthError) -> anyhow::Error {
    match e {
        AuthError::EmailTaken => anyhow!("a user with email {} already exists", email.trim()),
        AuthError::NotFound => anyhow!("no such user"),
        AuthError::Invalid(why) => anyhow!("{email:?} is not an email address: {why}"),
        e => anyhow::Error::new(e),
    }
}

/// Reads one line from stdin (the trailing newline is not part of the password) and
/// checks it against the registration rules, so the error can say where it came from;
/// the account code hashes it.
async fn password_from_stdin() -> anyhow::Result<String> {
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|_| line)
    })
    .await??;
    let password = line
        .strip_suffix('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .unwrap_or(&line)
        .to_string();
    if let Err(why) = crate::auth::password::validate_new_password(&password) {
        bail!("{why} (read from standard input)");
    }
    Ok(password)
}
