-- Per-user job counters, so plan quotas cost one row lookup instead of counting the
-- user's jobs inside the single writer on every submission (a range scan that grew with
-- the user's jobs or backlog: at a few thousand queued jobs it was most of the writer's
-- time).

-- Jobs each user created in their current quota period, written by the submit
-- transaction. One row per user: a new period replaces it, starting from an exact count
-- of the jobs created since the new period start. Jobs purged by retention stay counted.
CREATE TABLE job_usage (
    user_id      TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    period_start INTEGER NOT NULL,           -- ms, the entitlement's period start
    jobs         INTEGER NOT NULL            -- created since period_start
) WITHOUT ROWID;

-- Each user's active jobs (queued, running, retrying), kept exact by triggers on every
-- insert, status change and delete, whatever code path (or process) makes it.
CREATE TABLE job_active (
    user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    active  INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO job_active (user_id, active)
    SELECT user_id, COUNT(*) FROM jobs
    WHERE user_id IS NOT NULL AND status IN ('queued', 'running', 'retrying')
    GROUP BY user_id;

CREATE TRIGGER job_active_insert AFTER INSERT ON jobs
WHEN NEW.user_id IS NOT NULL AND NEW.status IN ('queued', 'running', 'retrying')
BEGIN
    INSERT INTO job_active (user_id, active) VALUES (NEW.user_id, 1)
        ON CONFLICT (user_id) DO UPDATE SET active = active + 1;
END;

CREATE TRIGGER job_active_delete AFTER DELETE ON jobs
WHEN OLD.user_id IS NOT NULL AND OLD.status IN ('queued', 'running', 'retrying')
BEGIN
    UPDATE job_active SET active = active - 1 WHERE user_id = OLD.user_id;
END;

-- Only when activeness or owner changes: claim (queued → running) and progress updates
-- do not fire it.
CREATE TRIGGER job_active_update AFTER UPDATE OF status, user_id ON jobs
WHEN OLD.user_id IS NOT NEW.user_id
  OR (OLD.status IN ('queued', 'running', 'retrying'))
     IS NOT (NEW.status IN ('queued', 'running', 'retrying'))
BEGIN
    UPDATE job_active SET active = active - 1
        WHERE user_id = OLD.user_id
          AND OLD.status IN ('queued', 'running', 'retrying');
    INSERT INTO job_active (user_id, active)
        SELECT NEW.user_id, 1
        WHERE NEW.user_id IS NOT NULL AND NEW.status IN ('queued', 'running', 'retrying')
        ON CONFLICT (user_id) DO UPDATE SET active = active + 1;
END;
