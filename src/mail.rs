//! Outgoing mail through the job queue: flows enqueue a `mail` job inside their own write
//! (so a mail exists if and only if its cause committed), and the worker delivers it over
//! SMTP with retries — or, with no `mail.smtp_url` (offline mode), writes it to the log.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::jobs::{Handler, JobContext, JobFailure, KindSpec};
use crate::storage::jobs::{NewJob, insert_job};
use crate::storage::{Conn, StorageError};

pub const KIND: &str = "mail";
/// The reserved system queue: user backlogs never delay mail.
pub const QUEUE: &str = crate::config::SYSTEM_QUEUE;
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mail {
    pub to: String,
    pub from: String,
    pub subject: String,
    pub body: String,
}

/// Wakes the dispatcher of [`QUEUE`] after a commit that queued a mail. A narrow handle
/// given to the services at construction, so they need no handle on the job system.
#[derive(Clone)]
pub struct WakeMail(Arc<dyn Fn() + Send + Sync>);

impl WakeMail {
    pub fn new(wake: impl Fn() + Send + Sync + 'static) -> WakeMail {
        WakeMail(Arc::new(wake))
    }

    /// For processes that run no mail queue (the CLI): the server's dispatcher finds the
    /// job on its next poll.
    pub fn none() -> WakeMail {
        WakeMail::new(|| {})
    }

    pub fn wake(&self) {
        (self.0)()
    }
}

/// Enqueues `mail` in the caller's write transaction. Wake the queue ([`WakeMail`], or
/// `jobs.notify(QUEUE)`) after it commits.
pub fn enqueue_in(conn: &Conn, mail: &Mail, now: i64) -> Result<String, StorageError> {
    let id = crate::ids::new_id_at(now);
    let payload = serde_json::to_string(mail).map_err(|e| StorageError::Corrupt(e.to_string()))?;
    insert_job(
        conn,
        &NewJob {
            id: &id,
            user_id: None,
            kind: KIND,
            queue: QUEUE,
            priority: 10,
            payload: &payload,
            max_attempts: 8,
            run_at: now,
            idempotency_key: None,
            request_hash: None,
            now,
        },
    )?;
    Ok(id)
}

pub fn kind_spec() -> KindSpec {
    KindSpec {
        name: KIND.into(),
        queue: QUEUE.into(),
        handler: Arc::new(MailHandler),
        public: false,
        billable: false,
        timeout: Some(Duration::from_secs(60)),
        max_attempts: Some(8),
    }
}

struct MailHandler;

impl Handler for MailHandler {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Result<Value, JobFailure>> {
        Box::pin(async move {
            let mail: Mail = serde_json::from_value(ctx.payload.clone())
                .map_err(|e| JobFailure::Permanent(format!("malformed mail job: {e}")))?;
            let smtp = ctx.state.config.mail.smtp_url.clone();
            if smtp.is_empty() {
                // Offline mode: the log is the mailbox.
                tracing::info!(
                    target: "warpbase::mail",
                    to = %mail.to,
                    subject = %mail.subject,
                    "mail (not sent: mail.smtp_url is empty)\n{}",
                    mail.body
                );
                return Ok(serde_json::json!({ "delivered": "log" }));
            }
            send_smtp(smtp.expose(), &mail).await?;
            Ok(serde_json::json!({ "delivered": "smtp" }))
        })
    }
}

async fn send_smtp(url: &str, mail: &Mail) -> Result<(), JobFailure> {
    let from: Mailbox = mail
        .from
        .parse()
        .map_err(|e| JobFailure::Permanent(format!("invalid mail.from: {e}")))?;
    let to: Mailbox = mail
        .to
        .parse()
        .map_err(|e| JobFailure::Permanent(format!("invalid recipient: {e}")))?;
    let message = Message::builder()
        .from(from)
        .to(to)
        .subject(mail.subject.clone())
        .body(mail.body.clone())
        .map_err(|e| JobFailure::Permanent(format!("cannot build the mail: {e}")))?;
    let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
        .map_err(|e| JobFailure::Permanent(format!("invalid mail.smtp_url: {e}")))?
        .timeout(Some(SEND_TIMEOUT))
        .build();
    match tokio::time::timeout(SEND_TIMEOUT, transport.send(message)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.is_permanent() => Err(JobFailure::Permanent(format!(
            "SMTP rejected the mail: {e}"
        ))),
        Ok(Err(e)) => Err(JobFailure::Retryable(format!("SMTP delivery failed: {e}"))),
        Err(_) => Err(JobFailure::Retryable("SMTP delivery timed out".into())),
    }
}
