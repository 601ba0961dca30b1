-- Fair claiming, the reserved system queue, and upload retention.
--
-- 1. `jobs_claim` gains the owner: (queue, user_id, priority DESC, run_at). A claim now
--    takes the owners of a queue's waiting jobs in turn (internal jobs, then users by
--    id) and orders by priority only within each owner's jobs, so one user's backlog or
--    priority no longer starves another's jobs. Every step stays a seek: the next owner
--    is `MIN(user_id) … user_id > ?`, its priorities and due jobs are ranges under it.
--    It replaces the old index rather than joining it: every index on `jobs` is moved by
--    every claim and finish.
-- 2. Internal jobs (mail, usage reports) run on the reserved `system` queue, which users
--    cannot submit to; the ones still waiting on a shared queue move there.
-- 3. Uploads are purged by age: an index on when they were stored.

DROP INDEX jobs_claim;
CREATE INDEX jobs_claim ON jobs(queue, user_id, priority DESC, run_at)
    WHERE status IN ('queued', 'retrying');

UPDATE jobs SET queue = 'system'
    WHERE user_id IS NULL AND (kind = 'mail' OR kind = 'stripe_usage')
      AND (status = 'queued' OR status = 'retrying');

CREATE INDEX uploads_created ON uploads(created_at);
