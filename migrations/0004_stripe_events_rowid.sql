-- stripe_events becomes an ordinary rowid table with a UNIQUE index on the event id.
--
-- Before, it was WITHOUT ROWID with the random Stripe id as the clustering key and the
-- whole payload (~1.5-2 KB) inline: every new event landed on a random leaf of a tree
-- that quickly outgrew the page cache (a read and a dirty page per event), and rows that
-- large do not even fit a WITHOUT ROWID leaf cell (~1 KB at 4 KB pages), so each also
-- took an overflow page. Now rows append at the end of the table in arrival order and
-- only the small index entry (id, rowid) lands at a random place.
--
-- Exactly-once is unchanged: the UNIQUE index refuses a second row with the same id
-- (`INSERT ... ON CONFLICT(id)` targets it), and `event_status` is an index probe.
--
-- Runs inside the migration's transaction: a failure leaves the old table untouched.
-- Nothing references stripe_events (no foreign keys, views or triggers), so dropping and
-- renaming is safe with foreign_keys=ON.

CREATE TABLE stripe_events_new (
    id           TEXT NOT NULL,
    type         TEXT NOT NULL,
    created      INTEGER NOT NULL,           -- Stripe's `created`, unix seconds
    status       TEXT NOT NULL CHECK (status IN ('applied', 'ignored', 'stale', 'failed')),
    reason       TEXT,
    user_id      TEXT,
    payload      TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    processed_at INTEGER NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 1
);

-- Existing rows keep every column; copied in arrival order so rowids follow it too.
INSERT INTO stripe_events_new
    (id, type, created, status, reason, user_id, payload, received_at, processed_at, attempts)
SELECT id, type, created, status, reason, user_id, payload, received_at, processed_at, attempts
FROM stripe_events
ORDER BY received_at, id;

DROP TABLE stripe_events;
ALTER TABLE stripe_events_new RENAME TO stripe_events;

CREATE UNIQUE INDEX stripe_events_id ON stripe_events(id);
-- The admin list pages by (received_at, id), newest first. The old indexes carried the
-- primary key `id` implicitly; a rowid table's carry the rowid, so `id` is named here to
-- keep that ORDER BY served by the index instead of a sort.
CREATE INDEX stripe_events_status ON stripe_events(status, received_at, id);
CREATE INDEX stripe_events_received ON stripe_events(received_at, id);
