//! The built-in job kinds and how they plug into the worker: `demo`, `analyze`, and the
//! config-defined `command` kinds. Internal kinds (mail, usage reports) are contributed by
//! their modules when the App is built.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde_json::Value;

use super::demo::{DemoPayload, run_demo};
use super::{Handler, JobContext, JobFailure, KindSpec};
use crate::config::Config;
use crate::state::AppState;

pub fn builtin(_config: &Config) -> Vec<KindSpec> {
    vec![KindSpec {
        name: "demo".into(),
        queue: "fast".into(),
        handler: Arc::new(Demo),
        public: true,
        billable: true,
        timeout: None,
        max_attempts: None,
    }]
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
            let progress = ctx.progress.clone();
            Ok(
                run_demo(&payload, ctx.attempt, ctx.cancel.clone(), |pct, msg| {
                    progress.report(pct, msg)
                })
                .await?,
            )
        })
    }
}
