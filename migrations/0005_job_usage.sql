-- Jobs each user created in their current quota period, kept in the same transaction as
-- every submission: the period quota check and `/me`'s usage line read one row instead
-- of counting the user's jobs (a range scan that grew with every job and ran inside the
-- single writer on every submission). One row per user: a new period replaces it,
-- starting from an exact count of the jobs created since the new period start.
CREATE TABLE job_usage (
    user_id      TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    period_start INTEGER NOT NULL,           -- ms, the entitlement's period start
    jobs         INTEGER NOT NULL            -- created since period_start
) WITHOUT ROWID;
