//! Billing rows: customers, the per-user subscription state, received Stripe events, and
//! the offline fake Stripe's records.

use rusqlite::{Connection, OptionalExtension, params};

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
pub fn event_status(conn: &Connection, id: &str) -> Result<Option<String>, StorageError> {
    Ok(conn
        .prepare_cached("SELECT status FROM stripe_events WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?)
}

pub struct EventRecord<'a> {
    pub id: &'a str,
    pub event_type: &'a str,
    pub created: i64,
    pub status: &'a str,
    pub reason: Option<&'a str>,
    pub user_id: Option<&'a str>,
    pub payload: &'a str,
}

/// Records the outcome of processing an event: a new row, or an update of a row that
/// failed before (a retried delivery or an admin replay).
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
    pub status: String,
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
    status: Option<&str>,
    before: Option<(Millis, &str)>,
    limit: u32,
) -> Result<Vec<EventRow>, StorageError> {
    let (t, id) = before.unwrap_or((i64::MAX, ""));
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLS} FROM stripe_events
         WHERE (?1 IS NULL OR status = ?1) AND (received_at, id) < (?2, ?3)
         ORDER BY received_at DESC, id DESC LIMIT ?4"
    ))?;
    let rows = stmt
        .query_map(params![status, t, id, limit], event_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
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
