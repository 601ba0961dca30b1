-- Billing: Stripe customers, the subscription state per user, every webhook event
-- received (exactly-once processing and the admin view), and the built-in fake Stripe.

-- One Stripe customer per user, created once and reused.
CREATE TABLE billing_customers (
    user_id     TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    customer_id TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;

-- The subscription state engine's memory, one row per user. Times in unix SECONDS
-- (Stripe's unit), unlike the rest of the schema.
CREATE TABLE billing_state (
    user_id              TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    state                TEXT NOT NULL,      -- JSON of billing::engine::BillingState
    status               TEXT NOT NULL,      -- denormalised for listings
    plan                 TEXT NOT NULL,
    subscription_id      TEXT,
    updated_at           INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX billing_state_subscription ON billing_state(subscription_id);

-- Every webhook event, inserted in the same transaction that applies it: the primary
-- key makes processing exactly-once.
CREATE TABLE stripe_events (
    id           TEXT PRIMARY KEY,
    type         TEXT NOT NULL,
    created      INTEGER NOT NULL,           -- Stripe's `created`, unix seconds
    status       TEXT NOT NULL CHECK (status IN ('applied', 'ignored', 'stale', 'failed')),
    reason       TEXT,
    user_id      TEXT,
    payload      TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    processed_at INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 1
) WITHOUT ROWID;
CREATE INDEX stripe_events_status ON stripe_events(status, received_at);
CREATE INDEX stripe_events_received ON stripe_events(received_at);

-- The offline fake Stripe's own records (never used with a real secret key).
CREATE TABLE fake_checkout_sessions (
    id          TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    customer_id TEXT NOT NULL,
    plan        TEXT NOT NULL,
    price_id    TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('open', 'complete', 'canceled')),
    success_url TEXT NOT NULL,
    cancel_url  TEXT NOT NULL,
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE fake_subscriptions (
    id                   TEXT PRIMARY KEY,
    customer_id          TEXT NOT NULL,
    user_id              TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    plan                 TEXT NOT NULL,
    price_id             TEXT NOT NULL,
    status               TEXT NOT NULL,
    current_period_start INTEGER NOT NULL,
    current_period_end   INTEGER NOT NULL,
    cancel_at_period_end INTEGER NOT NULL DEFAULT 0,
    created              INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX fake_subscriptions_customer ON fake_subscriptions(customer_id);

CREATE TABLE fake_meter_events (
    identifier  TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    event_name  TEXT NOT NULL,
    value       INTEGER NOT NULL,
    timestamp   INTEGER NOT NULL
) WITHOUT ROWID;
