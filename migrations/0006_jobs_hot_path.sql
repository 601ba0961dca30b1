-- warpbase: foreign_keys=off
--
-- The jobs table, rebuilt so that every job costs the writer less (no change in meaning).
--
-- Every job is written three times by the single writer (insert, claim, finish); that
-- writer is what bounds end-to-end throughput. A profile showed two avoidable costs:
--
-- 1. Constant IN lists of three or more values. SQLite evaluates `x IN ('a','b','c')`
--    by building a temporary b-tree of the values, once per statement that evaluates it.
--    The status CHECK (six values), the partial index `jobs_user_active` and the
--    `job_active` triggers (three values each) did that on every insert, claim and
--    finish: up to seven temporary b-trees per job state change. They are written below
--    as chains of `=` joined by OR, which SQLite evaluates as plain comparisons. Lists of
--    two (`jobs_claim`) are already compared directly and stay as they are.
-- 2. Indexes that every state change had to move: `jobs_status (status, finished_at)`
--    changed on insert, claim and finish, and `jobs_user_active` on insert and finish,
--    although nothing reads them on a hot path any more (quotas read the `job_active`
--    counter since 0005). They are replaced by two partial indexes a job enters at most
--    once, when it ends: finished jobs by end time (retention purges) and dead jobs by id
--    (the dead-letter list, which before read every job to find the dead ones).
--
-- The rebuild follows SQLite's procedure for changing a table: the runner turns foreign
-- keys off for this migration (the first line asks for it), so dropping the old table
-- does not cascade to job_attempts; it runs `PRAGMA foreign_key_check` before committing.
-- Runs in one transaction: a failure leaves the old table as it was.

CREATE TABLE jobs_new (
    id              TEXT PRIMARY KEY,
    user_id         TEXT REFERENCES users(id) ON DELETE SET NULL,  -- NULL: internal job
    kind            TEXT NOT NULL,
    queue           TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status = 'queued' OR status = 'running'
                                         OR status = 'retrying' OR status = 'succeeded'
                                         OR status = 'dead' OR status = 'canceled'),
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
    finished_at     INTEGER,                                 -- set exactly when the job ends (succeeded, dead, canceled)
    updated_at      INTEGER NOT NULL
);

INSERT INTO jobs_new
    (id, user_id, kind, queue, status, priority, payload, result, error, attempt,
     max_attempts, budget, run_at, lease_until, worker, cancel_requested, progress_pct,
     progress_msg, idempotency_key, request_hash, created_at, started_at, finished_at,
     updated_at)
SELECT id, user_id, kind, queue, status, priority, payload, result, error, attempt,
       max_attempts, budget, run_at, lease_until, worker, cancel_requested, progress_pct,
       progress_msg, idempotency_key, request_hash, created_at, started_at, finished_at,
       updated_at
FROM jobs
ORDER BY rowid;

DROP TABLE jobs;
ALTER TABLE jobs_new RENAME TO jobs;

-- Claiming: runnable jobs of a queue in claim order (priority, then run_at).
CREATE INDEX jobs_claim ON jobs(queue, priority DESC, run_at)
    WHERE status IN ('queued', 'retrying');
-- The rescuer: running jobs by lease.
CREATE INDEX jobs_lease ON jobs(lease_until) WHERE status = 'running';
-- A user's jobs, newest first; also the period count of quotas (ids are time-ordered).
CREATE INDEX jobs_user ON jobs(user_id, id);
-- Ended jobs by when they ended: retention purges.
CREATE INDEX jobs_finished ON jobs(finished_at) WHERE finished_at IS NOT NULL;
-- The dead-letter queue, newest first, without reading the other jobs.
CREATE INDEX jobs_dead ON jobs(id) WHERE status = 'dead';
CREATE UNIQUE INDEX jobs_idempotency ON jobs(user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- The job_active triggers of 0005 (dropped with the old table), same logic, OR chains.
CREATE TRIGGER job_active_insert AFTER INSERT ON jobs
WHEN NEW.user_id IS NOT NULL
 AND (NEW.status = 'queued' OR NEW.status = 'running' OR NEW.status = 'retrying')
BEGIN
    INSERT INTO job_active (user_id, active) VALUES (NEW.user_id, 1)
        ON CONFLICT (user_id) DO UPDATE SET active = active + 1;
END;

CREATE TRIGGER job_active_delete AFTER DELETE ON jobs
WHEN OLD.user_id IS NOT NULL
 AND (OLD.status = 'queued' OR OLD.status = 'running' OR OLD.status = 'retrying')
BEGIN
    UPDATE job_active SET active = active - 1 WHERE user_id = OLD.user_id;
END;

-- Only when activeness or owner changes: claim (queued → running) and progress updates
-- do not fire it.
CREATE TRIGGER job_active_update AFTER UPDATE OF status, user_id ON jobs
WHEN OLD.user_id IS NOT NEW.user_id
  OR (OLD.status = 'queued' OR OLD.status = 'running' OR OLD.status = 'retrying')
     IS NOT (NEW.status = 'queued' OR NEW.status = 'running' OR NEW.status = 'retrying')
BEGIN
    UPDATE job_active SET active = active - 1
        WHERE user_id = OLD.user_id
          AND (OLD.status = 'queued' OR OLD.status = 'running' OR OLD.status = 'retrying');
    INSERT INTO job_active (user_id, active)
        SELECT NEW.user_id, 1
        WHERE NEW.user_id IS NOT NULL
          AND (NEW.status = 'queued' OR NEW.status = 'running' OR NEW.status = 'retrying')
        ON CONFLICT (user_id) DO UPDATE SET active = active + 1;
END;
