//! The built-in job kinds and how they plug into the worker: `demo`, `analyze`, and the
//! config-defined `command` kinds. Internal kinds (mail, usage reports) are contributed by
//! their modules when the App is built.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::Value;

use super::analyze::{AnalyzeLimits, analyze_archive};
use super::command::{CommandCtx, CommandSpec, run_command};
use super::demo::{DemoPayload, run_demo};
use super::{Handler, JobContext, JobFailure, KindSpec};
use crate::config::Config;
use crate::state::AppState;
use crate::storage::uploads as q;

/// Time a command gets between SIGTERM and SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);

pub fn builtin(config: &Config) -> Vec<KindSpec> {
    let mut kinds = vec![
        KindSpec {
            name: "demo".into(),
            queue: "fast".into(),
            handler: Arc::new(Demo),
            public: true,
            billable: true,
            timeout: None,
            max_attempts: None,
        },
        KindSpec {
            name: "analyze".into(),
            queue: "slow".into(),
            handler: Arc::new(Analyze),
            public: true,
            billable: true,
            timeout: None,
            max_attempts: None,
        },
    ];
    for (name, k) in &config.jobs.kinds {
        let Some(spec) = CommandSpec::from_argv(&k.command) else {
            continue;
        };
        kinds.push(KindSpec {
            name: name.clone(),
            queue: k.queue.clone().unwrap_or_else(|| "slow".into()),
            handler: Arc::new(Command(spec)),
            public: true,
            billable: true,
            timeout: k.timeout,
            max_attempts: k.max_attempts,
        });
    }
    kinds
}

struct Demo;

impl Handler for Demo {
    fn validate<'a>(
        &'a self,
        _state: &'a AppState,
        _user_id: &'a str,
        payload: &'a Value,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            DemoPayload::from_json(payload)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Result<Value, JobFailure>> {
        Box::pin(async move {
            let payload = DemoPayload::from_json(&ctx.payload)?;
            let JobContext {
                attempt,
                cancel,
                progress,
                ..
            } = ctx;
            Ok(run_demo(&payload, attempt, cancel, |pct, msg| {
                progress.report(pct, msg)
            })
            .await?)
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnalyzePayload {
    upload_id: String,
}

struct Analyze;

fn analyze_payload(v: &Value) -> Result<AnalyzePayload, String> {
    AnalyzePayload::deserialize(v).map_err(|e| format!("invalid analyze payload: {e}"))
}

impl Handler for Analyze {
    fn validate<'a>(
        &'a self,
        state: &'a AppState,
        user_id: &'a str,
        payload: &'a Value,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let p = analyze_payload(payload)?;
            let id = p.upload_id.clone();
            let upload = state
                .storage
                .read(move |c| q::get_upload(c, &id))
                .await
                .map_err(|_| "cannot check the upload right now".to_string())?;
            match upload {
                Some(u) if u.user_id == user_id => Ok(()),
                _ => Err(format!("no upload {:?} of yours", p.upload_id)),
            }
        })
    }

    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Result<Value, JobFailure>> {
        Box::pin(async move {
            let p = analyze_payload(&ctx.payload).map_err(JobFailure::Permanent)?;
            let owner = ctx.user_id.clone().unwrap_or_default();
            let limits = ctx.state.jobs.allowance(&owner).await.limits;
            // An upload may expand well beyond its compressed size, within reason.
            let max_unpacked = limits
                .max_upload_bytes
                .saturating_mul(20)
                .clamp(1 << 20, 4 << 30);
            let limits = AnalyzeLimits {
                max_uncompressed_bytes: max_unpacked,
                max_file_bytes: max_unpacked.min(AnalyzeLimits::default().max_file_bytes),
                ..AnalyzeLimits::default()
            };
            let data_dir = ctx.state.config.data_dir.clone();
            let archive = data_dir.join("uploads").join(&p.upload_id);
            if p.upload_id.contains(['/', '\\', '.']) || !archive.exists() {
                return Err(JobFailure::Permanent(format!(
                    "upload {:?} not found",
                    p.upload_id
                )));
            }
            let scratch = data_dir.join("tmp");
            let cancel = ctx.cancel.clone();
            let progress = ctx.progress.clone();
            let result = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&scratch).map_err(super::analyze::AnalyzeError::Io)?;
                analyze_archive(&archive, &scratch, &limits, &cancel, &mut |pct, msg| {
                    progress.report(pct, msg)
                })
            })
            .await
            .map_err(|_| JobFailure::Retryable("the analysis task failed".into()))??;
            serde_json::to_value(result).map_err(|e| JobFailure::Permanent(e.to_string()))
        })
    }
}

struct Command(CommandSpec);

impl Handler for Command {
    fn run(&self, ctx: JobContext) -> BoxFuture<'static, Result<Value, JobFailure>> {
        let spec = self.0.clone();
        Box::pin(async move {
            let progress = ctx.progress.clone();
            let out = run_command(
                &spec,
                CommandCtx {
                    job_id: &ctx.job_id,
                    attempt: ctx.attempt,
                    payload: &ctx.payload,
                    timeout: ctx.timeout,
                    term_grace: TERM_GRACE,
                    cancel: ctx.cancel.clone(),
                },
                move |pct, msg| progress.report(pct, msg),
            )
            .await?;
            Ok(out)
        })
    }
}
