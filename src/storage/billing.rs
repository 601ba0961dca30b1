//! Billing rows: customers, the per-user subscription state, received Stripe events, and
//! the offline fake Stripe's records.

use rusqlite::{Connection, OptionalExtension, params};

use super::states::EventStatus;
use super::{Millis, StorageError};

pub fn customer_of_user(conn: &Connection, user_id: &str) -> Result<Option<String>, StorageError> {
    Ok(conn
        .prepare_cached("SELECT customer_id FROM billing_customers WHERE user_id = ?1")?
        .query_row([user_id], |r| r.get(0))
        .optional()?)
}

pub fn user_of_customer(
    conn: &Connection,
    customer_id: &str,
) -> Result<Option<String>, StorageError> {
    Ok(conn
        .prepare_cached("SELECT user_id FROM billing_customers WHERE customer_id = ?1")?
        .query_row([customer_id], |r| r.get(0))
        .optional()?)
}

/// Links a customer to a user; keeps an existing link (the first customer wins).
pub fn link_customer(
    conn: &Connection,
    user_id: &str,
    customer_id: &str,
    now: Millis,
) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO billing_customers (user_id, customer_id, created_at) VALUES (?1, ?2, ?3)
         ON CONFLICT DO NOTHING",
        params![user_id, customer_id, now],
    )?;
    Ok(())
}

/// Every (user, customer) pair, for reconciliation.
pub fn all_customers(conn: &Connection) -> Result<Vec<(String, String)>, StorageError> {
    let mut stmt =
        conn.prepare("SELECT user_id, customer_id FROM billing_customers ORDER BY user_id")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// The engine state of a user as JSON.
pub fn load_state(conn: &Connection, user_id: &str) -> Result<Option<String>, StorageError> {
    Ok(conn
        .prepare_cached("SELECT state FROM billing_state WHERE user_id = ?1")?
        .query_row([user_id], |r| r.get(0))
        .optional()?)
}

pub struct StateRow<'a> {
    pub user_id: &'a str,
    pub state_json: &'a str,
    pub status: &'a str,
    pub plan: &'a str,
    pub subscription_id: Option<&'a str>,
}

pub fn save_state(conn: &Connection, s: &StateRow<'_>, now: Millis) -> Result<(), StorageError> {
    conn.prepare_cached(
        "INSERT INTO billing_state (user_id, state, status, plan, subscription_id, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT(user_id) DO UPDATE SET state = excluded.state, status = excluded.status,
             plan = excluded.plan, subscription_id = excluded.subscription_id,
             updated_at = excluded.updated_at",
    )?
    .execute(params![
        s.user_id,
        s.state_json,
        s.status,
        s.plan,
        s.subscription_id,
        now
    ])?;
    Ok(())
}

/// The user whose state follows this subscription.
pub fn user_of_subscription(
    conn: &Connection,
    subscription_id: &str,
) -> Result<Option<String>, StorageError> {
    Ok(conn
        .prepare_cached("SELECT user_id FROM billing_state WHERE subscription_id = ?1")?
        .query_row([subscription_id], |r| r.get(0))
        .optional()?)
}

/// The processing status of an event id, if it was received before.
pub fn event_status(conn: &Connection, id: &str) -> Result<Option<EventStatus>, StorageError> {
    Ok(conn
        .prepare_cached("SELECT status FROM stripe_events WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?)
}

pub struct EventRecord<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub created: i64,
    pub status: EventStatus,
    pub reason: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub payload: &'a str,
}

/// Records the outcome of processing an event: a new row, or an update of a row that
/// failed before (a retried delivery or an admin replay). `ON CONFLICT(id)` is the
/// UNIQUE index `stripe_events_id`: one row per event id, whatever the interleaving.
/// New rows append to the rowid table (migration 0004), in arrival order.
pub fn record_event(
    conn: &Connection,
    e: &EventRecord<'_>,
    now: Millis,
) -> Result<(), StorageError> {
    conn.prepare_cached(
        "INSERT INTO stripe_events (id, type, created, status, reason, user_id, payload, received_at, processed_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)
         ON CONFLICT(id) DO UPDATE SET status = excluded.status, reason = excluded.reason,
             user_id = COALESCE(excluded.user_id, user_id), processed_at = excluded.processed_at,
             attempts = attempts + 1",
    )?
    .execute(params![e.id, e.event_type, e.created, e.status, e.reason, e.user_id, e.payload, now])?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct EventRow {
    pub id: String,
    pub event_type: String,
    pub created: i64,
    pub status: EventStatus,
    pub reason: Option<String>,
    pub user_id: Option<String>,
    pub payload: String,
    pub received_at: Millis,
    pub processed_at: Millis,
    pub attempts: u32,
}

const EVENT_COLS: &str =
    "id, type, created, status, reason, user_id, payload, received_at, processed_at, attempts";

fn event_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<EventRow> {
    Ok(EventRow {
        id: r.get(0)?,
        event_type: r.get(1)?,
        created: r.get(2)?,
        status: r.get(3)?,
        reason: r.get(4)?,
        user_id: r.get(5)?,
        payload: r.get(6)?,
        received_at: r.get(7)?,
        processed_at: r.get(8)?,
        attempts: r.get(9)?,
    })
}

pub fn get_event(conn: &Connection, id: &str) -> Result<Option<EventRow>, StorageError> {
    Ok(conn
        .query_row(
            &format!("SELECT {EVENT_COLS} FROM stripe_events WHERE id = ?1"),
            [id],
            event_from_row,
        )
        .optional()?)
}

/// Newest first; `before` is `(received_at, id)` of the last item of the previous page.
pub fn list_events(
    conn: &Connection,
    status: Option<EventStatus>,
    before: Option<(Millis, &str)>,
    limit: u32,
) -> Result<Vec<EventRow>, StorageError> {
    let (t, id) = before.unwrap_or((i64::MAX, ""));
    let mut stmt = conn.prepare_cached(&list_events_sql())?;
    let rows = stmt
        .query_map(params![status, t, id, limit], event_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Served by the `(received_at, id)` index newest first (see migration 0004).
fn list_events_sql() -> String {
    format!(
        "SELECT {EVENT_COLS} FROM stripe_events
         WHERE (?1 IS NULL OR status = ?1) AND (received_at, id) < (?2, ?3)
         ORDER BY received_at DESC, id DESC LIMIT ?4"
    )
}

/// Counts events by (type, status), for metrics and tests.
pub fn count_events(conn: &Connection) -> Result<Vec<(String, String, u64)>, StorageError> {
    let mut stmt =
        conn.prepare("SELECT type, status, COUNT(*) FROM stripe_events GROUP BY type, status")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

// ---- the offline fake Stripe ----

#[derive(Debug, Clone)]
pub struct FakeSession {
    pub id: String,
    pub user_id: String,
    pub customer_id: String,
    pub plan: String,
    pub price_id: String,
    pub status: String,
    pub success_url: String,
    pub cancel_url: String,
    pub created_at: Millis,
}

pub fn insert_fake_session(conn: &Connection, s: &FakeSession) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO fake_checkout_sessions (id, user_id, customer_id, plan, price_id, status, success_url, cancel_url, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![s.id, s.user_id, s.customer_id, s.plan, s.price_id, s.status, s.success_url, s.cancel_url, s.created_at],
    )?;
    Ok(())
}

pub fn get_fake_session(conn: &Connection, id: &str) -> Result<Option<FakeSession>, StorageError> {
    Ok(conn
        .query_row(
            "SELECT id, user_id, customer_id, plan, price_id, status, success_url, cancel_url, created_at
             FROM fake_checkout_sessions WHERE id = ?1",
            [id],
            |r| {
                Ok(FakeSession {
                    id: r.get(0)?,
                    user_id: r.get(1)?,
                    customer_id: r.get(2)?,
                    plan: r.get(3)?,
                    price_id: r.get(4)?,
                    status: r.get(5)?,
                    success_url: r.get(6)?,
                    cancel_url: r.get(7)?,
                    created_at: r.get(8)?,
                })
            },
        )
        .optional()?)
}

/// Moves an open session to `status`; false if it was not open (paid or canceled already).
pub fn close_fake_session(conn: &Connection, id: &str, status: &str) -> Result<bool, StorageError> {
    Ok(conn.execute(
        "UPDATE fake_checkout_sessions SET status = ?2 WHERE id = ?1 AND status = 'open'",
        params![id, status],
    )? == 1)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeSubscription {
    pub id: String,
    pub customer_id: String,
    pub user_id: String,
    pub plan: String,
    pub price_id: String,
    pub status: String,
    pub current_period_start: i64,
    pub current_period_end: i64,
    pub cancel_at_period_end: bool,
    pub created: i64,
}

pub fn upsert_fake_subscription(
    conn: &Connection,
    s: &FakeSubscription,
) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO fake_subscriptions (id, customer_id, user_id, plan, price_id, status,
             current_period_start, current_period_end, cancel_at_period_end, created)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
         ON CONFLICT(id) DO UPDATE SET plan = excluded.plan, price_id = excluded.price_id,
             status = excluded.status, current_period_start = excluded.current_period_start,
             current_period_end = excluded.current_period_end,
             cancel_at_period_end = excluded.cancel_at_period_end",
        params![
            s.id,
            s.customer_id,
            s.user_id,
            s.plan,
            s.price_id,
            s.status,
            s.current_period_start,
            s.current_period_end,
            s.cancel_at_period_end,
            s.created
        ],
    )?;
    Ok(())
}

fn fake_sub_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FakeSubscription> {
    Ok(FakeSubscription {
        id: r.get(0)?,
        customer_id: r.get(1)?,
        user_id: r.get(2)?,
        plan: r.get(3)?,
        price_id: r.get(4)?,
        status: r.get(5)?,
        current_period_start: r.get(6)?,
        current_period_end: r.get(7)?,
        cancel_at_period_end: r.get(8)?,
        created: r.get(9)?,
    })
}

const FAKE_SUB_COLS: &str = "id, customer_id, user_id, plan, price_id, status, current_period_start, current_period_end, cancel_at_period_end, created";

pub fn fake_subscriptions_of_customer(
    conn: &Connection,
    customer_id: &str,
) -> Result<Vec<FakeSubscription>, StorageError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {FAKE_SUB_COLS} FROM fake_subscriptions WHERE customer_id = ?1 ORDER BY created DESC"
    ))?;
    let rows = stmt
        .query_map([customer_id], fake_sub_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Records a meter event once per identifier (Stripe's deduplication); true if new.
pub fn insert_fake_meter_event(
    conn: &Connection,
    identifier: &str,
    customer_id: &str,
    event_name: &str,
    value: u64,
    timestamp: i64,
) -> Result<bool, StorageError> {
    Ok(conn.execute(
        "INSERT INTO fake_meter_events (identifier, customer_id, event_name, value, timestamp)
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
        params![identifier, customer_id, event_name, value, timestamp],
    )? == 1)
}

pub fn fake_meter_total(conn: &Connection, customer_id: &str) -> Result<u64, StorageError> {
    Ok(conn.query_row(
        "SELECT COALESCE(SUM(value), 0) FROM fake_meter_events WHERE customer_id = ?1",
        [customer_id],
        |r| r.get(0),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::migrate;

    /// Every column of every stripe_events row, in id order.
    type Row = (
        String,
        String,
        i64,
        String,
        Option<String>,
        Option<String>,
        String,
        i64,
        i64,
        i64,
    );

    fn all_rows(conn: &Connection) -> Vec<Row> {
        let mut stmt = conn
            .prepare(
                "SELECT id, type, created, status, reason, user_id, payload, received_at,
                        processed_at, attempts
                 FROM stripe_events ORDER BY id",
            )
            .expect("prepare");
        stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
                r.get(8)?,
                r.get(9)?,
            ))
        })
        .expect("query")
        .collect::<Result<Vec<_>, _>>()
        .expect("rows")
    }

    fn at_version(dir: &std::path::Path, version: usize) -> Connection {
        let mut conn = crate::storage::open_writer_conn(&dir.join("warpbase.db")).expect("open");
        migrate::apply_list(&mut conn, &migrate::MIGRATIONS[..version]).expect("migrate");
        conn
    }

    fn event(id: &str, status: EventStatus) -> EventRecord<'_> {
        EventRecord {
            id,
            event_type: "invoice.paid",
            created: 1_750_000_000,
            status,
            reason: None,
            user_id: None,
            payload: r#"{"id":"x"}"#,
        }
    }

    /// 0004 rebuilds stripe_events as a rowid table: a database written by the 0003
    /// schema keeps every row and column, and an id already there is still refused.
    #[test]
    fn upgrading_from_0003_keeps_every_event_and_still_refuses_duplicates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut conn = at_version(dir.path(), 3);
        // Written with the 0003 code path: upsert into the WITHOUT ROWID table.
        let n = 300;
        for i in 0..n {
            let id = format!(
                "evt_{:024x}",
                (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            );
            let (status, reason, user) = match i % 4 {
                0 => (EventStatus::Applied, None, Some("usr_1")),
                1 => (
                    EventStatus::Ignored,
                    Some("no user of this instance has this customer"),
                    None,
                ),
                2 => (
                    EventStatus::Stale,
                    Some("older than the state"),
                    Some("usr_2"),
                ),
                _ => (EventStatus::Failed, Some("boom"), None),
            };
            let payload = format!(r#"{{"id":"{id}","pad":"{}"}}"#, "x".repeat(i * 7));
            let rec = EventRecord {
                id: &id,
                event_type: "customer.subscription.updated",
                created: 1_700_000_000 + i as i64,
                status,
                reason,
                user_id: user,
                payload: &payload,
            };
            record_event(&conn, &rec, 1_000 + (i as i64 % 17)).expect("insert");
            if i % 10 == 0 {
                // A retried delivery: same id, attempts goes up.
                record_event(&conn, &rec, 2_000).expect("retry");
            }
        }
        let before = all_rows(&conn);
        assert_eq!(before.len(), n);

        migrate::apply(&mut conn).expect("upgrade");
        assert_eq!(
            migrate::current_version(&conn).expect("version"),
            migrate::latest_version()
        );
        assert_eq!(all_rows(&conn), before, "every row and column kept");
        let check: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity");
        assert_eq!(check, "ok");
        // A rowid table now (WITHOUT ROWID tables have no rowid to select).
        let max_rowid: i64 = conn
            .query_row("SELECT MAX(rowid) FROM stripe_events", [], |r| r.get(0))
            .expect("rowid");
        assert_eq!(max_rowid, n as i64);

        // Duplicates: a plain INSERT of a known id is a unique violation ...
        let (known_id, known_status) = (before[0].0.clone(), before[0].3.clone());
        let err = conn
            .execute(
                "INSERT INTO stripe_events (id, type, created, status, payload, received_at, processed_at)
                 VALUES (?1, 'invoice.paid', 1, 'applied', '{}', 1, 1)",
                [&known_id],
            )
            .map_err(StorageError::from)
            .expect_err("a second row with the same id");
        assert!(err.is_unique_violation(), "{err}");
        // ... and the pipeline's upsert updates the one row instead of adding one.
        assert_eq!(
            event_status(&conn, &known_id).expect("status"),
            Some(known_status.parse().expect("a known status"))
        );
        record_event(&conn, &event(&known_id, EventStatus::Applied), 3_000).expect("upsert");
        let after = all_rows(&conn);
        assert_eq!(after.len(), n);
        let row = after.iter().find(|r| r.0 == known_id).expect("row");
        assert_eq!((row.3.as_str(), row.9), ("applied", before[0].9 + 1));

        // New events append after the copied ones.
        record_event(&conn, &event("evt_new", EventStatus::Ignored), 4_000).expect("new");
        let rowid: i64 = conn
            .query_row(
                "SELECT rowid FROM stripe_events WHERE id = 'evt_new'",
                [],
                |r| r.get(0),
            )
            .expect("rowid");
        assert_eq!(rowid, n as i64 + 1);
    }

    #[test]
    fn the_admin_list_pages_newest_first_without_gaps_or_repeats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let conn = at_version(dir.path(), migrate::MIGRATIONS.len());
        // Several events share a received_at, so the id breaks ties.
        let ids: Vec<String> = (0..23)
            .map(|i| format!("evt_{:02}", (i * 7) % 23))
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let status = if i % 3 == 0 {
                EventStatus::Failed
            } else {
                EventStatus::Applied
            };
            record_event(&conn, &event(id, status), 100 + (i as i64 / 4)).expect("insert");
        }
        for status in [None, Some(EventStatus::Failed)] {
            let mut seen: Vec<(Millis, String)> = Vec::new();
            let mut cursor: Option<(Millis, String)> = None;
            loop {
                let page = list_events(
                    &conn,
                    status,
                    cursor.as_ref().map(|(t, id)| (*t, id.as_str())),
                    4,
                )
                .expect("page");
                let Some(last) = page.last() else { break };
                cursor = Some((last.received_at, last.id.clone()));
                seen.extend(page.iter().map(|e| (e.received_at, e.id.clone())));
            }
            let mut want: Vec<(Millis, String)> = ids
                .iter()
                .enumerate()
                .filter(|(i, _)| status.is_none() || i % 3 == 0)
                .map(|(i, id)| (100 + (i as i64 / 4), id.clone()))
                .collect();
            want.sort();
            want.reverse();
            assert_eq!(seen, want, "status {status:?}");
        }
        // The newest-first order comes from an index, not from sorting every event.
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {}", list_events_sql()))
            .expect("plan")
            .query_map(params![None::<String>, i64::MAX, "", 50], |r| r.get(3))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("plan rows");
        assert!(
            !plan.iter().any(|step| step.contains("TEMP B-TREE")),
            "{plan:?}"
        );
    }
}
