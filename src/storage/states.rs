//! The typed states stored in the database: each is one enum whose strings live only
//! here (`as_str`, `FromStr`, `Display`), which reads and writes itself as SQL text
//! (`ToSql`/`FromSql`), serialises as that text, and derives its OpenAPI schema, so no
//! doc-only copy of a state list exists anywhere.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};

/// A string that names no variant of the state it was parsed as.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct UnknownState {
    pub kind: &'static str,
    pub value: String,
}

/// Declares a state enum with its strings, and every conversion from one place.
macro_rules! states {
    (
        $(#[$meta:meta])*
        $name:ident ($kind:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash,
            serde::Serialize, serde::Deserialize, utoipa::ToSchema,
        )]
        #[serde(rename_all = "snake_case")]
        pub enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownState;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownState { kind: $kind, value: other.to_owned() }),
                }
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                value
                    .as_str()?
                    .parse()
                    .map_err(|e: UnknownState| FromSqlError::Other(Box::new(e)))
            }
        }
    };
}

states! {
    /// A user's subscription status as warpbase reports it (the API's `Entitlement.status`):
    /// `active`/`trialing` with a future period end, and `past_due` within the grace
    /// period, give the paid plan; `canceled` and `expired` report `plan: "free"`.
    SubStatus ("subscription status") {
        /// No subscription, or one whose first payment has not gone through yet.
        Free = "free",
        Trialing = "trialing",
        Active = "active",
        /// A renewal payment failed; access continues until `grace_until`.
        PastDue = "past_due",
        /// The subscription ended (`customer.subscription.deleted`): no access.
        Canceled = "canceled",
        /// The period or the grace ran out with no renewal.
        Expired = "expired",
    }
}

states! {
    /// How a Stripe event was processed (`stripe_events.status`).
    EventStatus ("event status") {
        /// It changed (or linked) a user's billing state.
        Applied = "applied",
        /// Nothing to do for it (an unknown customer, a type warpbase does not follow).
        Ignored = "ignored",
        /// Older than what the state already reflects.
        Stale = "stale",
        /// Applying it failed; kept for replay.
        Failed = "failed",
    }
}

states! {
    /// Where a job is in its life (`jobs.status`).
    JobStatus ("job status") {
        Queued = "queued",
        Running = "running",
        /// Failed an attempt; waits for `run_at` to run again.
        Retrying = "retrying",
        Succeeded = "succeeded",
        /// Out of attempts: in the dead-letter queue.
        Dead = "dead",
        Canceled = "canceled",
    }
}

impl JobStatus {
    /// Ended: succeeded, dead or canceled (an admin may still retry a dead or canceled
    /// job, which queues it again).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Dead | JobStatus::Canceled
        )
    }

    /// Waiting for a worker: queued, or retrying after a failed attempt.
    pub fn is_waiting(self) -> bool {
        matches!(self, JobStatus::Queued | JobStatus::Retrying)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T>(all: &[T])
    where
        T: Copy + PartialEq + std::fmt::Debug + std::fmt::Display + ToSql + FromSql,
        T: std::str::FromStr<Err = UnknownState> + serde::Serialize,
    {
        let conn = rusqlite::Connection::open_in_memory().expect("sqlite");
        for &s in all {
            let text = s.to_string();
            assert_eq!(text.parse::<T>(), Ok(s));
            assert_eq!(
                serde_json::to_value(s).expect("serialises"),
                serde_json::Value::from(text.as_str())
            );
            let (stored, back): (String, T) = conn
                .query_row("SELECT ?1, ?1", [&s], |r| Ok((r.get(0)?, r.get(1)?)))
                .expect("query");
            assert_eq!((stored.as_str(), back), (text.as_str(), s));
        }
    }

    #[test]
    fn every_state_round_trips_through_text_json_and_sql() {
        round_trips(SubStatus::ALL);
        round_trips(EventStatus::ALL);
        round_trips(JobStatus::ALL);
    }

    #[test]
    fn unknown_text_is_an_error_naming_the_state() {
        let e = "paused".parse::<SubStatus>().expect_err("unknown");
        assert_eq!(e.to_string(), "unknown subscription status \"paused\"");
        let conn = rusqlite::Connection::open_in_memory().expect("sqlite");
        let read: rusqlite::Result<JobStatus> =
            conn.query_row("SELECT 'exploded'", [], |r| r.get(0));
        assert!(read.is_err());
    }
}
