-- The foundation schema: bookkeeping, users and sessions (the identity every module
-- references), and the jobs queue (other modules enqueue into it inside their own
-- transactions). Times are INTEGER milliseconds since the Unix epoch.

CREATE TABLE schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at INTEGER NOT NULL
);

-- Small named values owned by the process itself (e.g. periodic task bookkeeping).
CREATE TABLE meta (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE users (
    id             TEXT PRIMARY KEY,
    email          TEXT NOT NULL UNIQUE,
    email_verified INTEGER NOT NULL DEFAULT 0,
    name           TEXT,
    password_hash  TEXT,                 -- NULL: OAuth-only account
    role           TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    token_version  INTEGER NOT NULL DEFAULT 0,
    disabled       INTEGER NOT NULL DEFAULT 0,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);

-- One row per signed-in client (a refresh-token family).
CREATE TABLE sessions (
    id                 TEXT PRIMARY KEY,
    user_id            TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    refresh_hash       BLOB NOT NULL UNIQUE,   -- SHA-256 of the current refresh token
    refresh_expires_at INTEGER NOT NULL,
    user_agent         TEXT,
    ip                 TEXT,
    created_at         INTEGER NOT NULL,
    last_used_at       INTEGER NOT NULL,
    revoked_at         INTEGER,
    revoked_reason     TEXT
);
CREATE INDEX sessions_user ON sessions(user_id, created_at);

-- The job queue. See docs/ARCHITECTURE.md "Jobs".
CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    user_id         TEXT REFERENCES users(id) ON DELETE SET NULL,  -- NULL: internal job
    kind            TEXT NOT NULL,
    queue           TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('queued','running','retrying','succeeded','dead','canceled')),
    priority        INTEGER NOT NULL DEFAULT 0,              -- higher runs first
    payload         TEXT NOT NULL,                           -- JSON
    result          TEXT,                                    -- JSON
    error           TEXT,
    attempt         INTEGER NOT NULL DEFAULT 0,              -- attempts started so far
    max_attempts    INTEGER NOT NULL,                        -- cap on `attempt`; a retry from the DLQ raises it
    budget          INTEGER NOT NULL,                        -- attempts granted per (re)submission
    run_at          INTEGER NOT NULL,
    lease_until     INTEGER,
    worker          TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress_pct    INTEGER NOT NULL DEFAULT 0,
    progress_msg    TEXT,
    idempotency_key TEXT,
    request_hash    TEXT,
    created_at      INTEGER NOT NULL,
    started_at      INTEGER,
    finished_at     INTEGER,
    updated_at      INTEGER NOT NULL
);
-- Claiming: runnable jobs of a queue in claim order (priority, then run_at).
CREATE INDEX jobs_claim ON jobs(queue, priority DESC, run_at)
    WHERE status IN ('queued', 'retrying');
-- The rescuer: running jobs by lease.
CREATE INDEX jobs_lease ON jobs(lease_until) WHERE status = 'running';
CREATE INDEX jobs_user ON jobs(user_id, id);
CREATE INDEX jobs_user_active ON jobs(user_id) WHERE status IN ('queued', 'running', 'retrying');
CREATE INDEX jobs_status ON jobs(status, finished_at);
CREATE UNIQUE INDEX jobs_idempotency ON jobs(user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- One row per finished attempt: the history kept for the dead-letter queue.
CREATE TABLE job_attempts (
    job_id      TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER NOT NULL,
    outcome     TEXT NOT NULL,   -- succeeded | retry | dead | canceled | timeout | interrupted
    error       TEXT,
    PRIMARY KEY (job_id, attempt)
) WITHOUT ROWID;

-- Archives uploaded for the `analyze` kind; the bytes live in data_dir/uploads/<id>.
CREATE TABLE uploads (
    id         TEXT PRIMARY KEY,
    user_id    TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    size       INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX uploads_user ON uploads(user_id, created_at);
