-- Accounts: refresh-token history (reuse detection), linked OAuth identities,
-- single-use tokens (email verification, password reset, OAuth exchange codes),
-- OAuth authorization state, and the security audit log.

-- Every refresh token that was rotated away, so presenting one again is detected as
-- reuse (the session's current token hash is sessions.refresh_hash).
CREATE TABLE refresh_history (
    hash       BLOB PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    rotated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX refresh_history_session ON refresh_history(session_id);

CREATE TABLE identities (
    provider       TEXT NOT NULL,
    subject        TEXT NOT NULL,
    user_id        TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    email          TEXT,
    email_verified INTEGER NOT NULL DEFAULT 0,
    created_at     INTEGER NOT NULL,
    PRIMARY KEY (provider, subject)
) WITHOUT ROWID;
CREATE UNIQUE INDEX identities_user_provider ON identities(user_id, provider);

-- Single-use secrets handed out by mail or redirect; only their SHA-256 is stored.
CREATE TABLE one_time_tokens (
    hash       BLOB PRIMARY KEY,
    purpose    TEXT NOT NULL CHECK (purpose IN ('verify_email', 'password_reset', 'oauth_exchange')),
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    expires_at INTEGER NOT NULL,
    used_at    INTEGER,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX one_time_tokens_expiry ON one_time_tokens(expires_at);

-- OAuth authorization requests in flight: state → PKCE verifier (+ nonce), single use.
CREATE TABLE oauth_states (
    state         TEXT PRIMARY KEY,
    provider      TEXT NOT NULL,
    pkce_verifier TEXT NOT NULL,
    nonce         TEXT,
    link_user_id  TEXT REFERENCES users(id) ON DELETE CASCADE,  -- set when linking
    expires_at    INTEGER NOT NULL,
    created_at    INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE audit_log (
    id         INTEGER PRIMARY KEY,
    user_id    TEXT,
    event      TEXT NOT NULL,
    ip         TEXT,
    user_agent TEXT,
    detail     TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX audit_log_user ON audit_log(user_id, created_at);
