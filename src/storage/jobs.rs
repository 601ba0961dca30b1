//! The job queue's rows: enqueue, claim, finish, cancel, retry, leases, listing.
//! See migrations/0001_foundation.sql and 0006_jobs_hot_path.sql (its rebuild) for the table
//! and its indexes.

use std::ops::ControlFlow;

use rusqlite::{Connection, OptionalExtension, params};

use super::states::JobStatus;
use super::{Millis, StorageError};

/// A job to enqueue. `user_id` None marks an internal job (mail, usage reports).
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub id: &'a str,
    pub user_id: Option<&'a str>,
    pub kind: &'a str,
    pub queue: &'a str,
    pub priority: i64,
    pub payload: &'a str,
    pub max_attempts: u32,
    pub run_at: Millis,
    pub idempotency_key: Option<&'a str>,
    pub request_hash: Option<&'a str>,
    pub now: Millis,
}

/// Inserts a queued job. Use inside the same write as the change that caused it, so the
/// job exists if and only if that change committed.
pub fn insert_job(conn: &Connection, j: &NewJob<'_>) -> Result<(), StorageError> {
    conn.prepare_cached(
        "INSERT INTO jobs (id, user_id, kind, queue, status, priority, payload, max_attempts,
                           budget, run_at, idempotency_key, request_hash, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?7, ?7, ?8, ?9, ?10, ?11, ?11)",
    )?
    .execute(params![
        j.id,
        j.user_id,
        j.kind,
        j.queue,
        j.priority,
        j.payload,
        j.max_attempts,
        j.run_at,
        j.idempotency_key,
        j.request_hash,
        j.now
    ])?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct JobRow {
    pub id: String,
    pub user_id: Option<String>,
    pub kind: String,
    pub queue: String,
    pub status: JobStatus,
    pub priority: i64,
    pub payload: String,
    pub result: Option<String>,
    pub error: Option<String>,
    pub attempt: u32,
    pub max_attempts: u32,
    pub budget: u32,
    pub run_at: Millis,
    pub lease_until: Option<Millis>,
    pub cancel_requested: bool,
    pub progress_pct: u8,
    pub progress_msg: Option<String>,
    pub request_hash: Option<String>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
}

const JOB_COLS: &str = "id, user_id, kind, queue, status, priority, payload, result, error, attempt, \
     max_attempts, budget, run_at, lease_until, cancel_requested, progress_pct, progress_msg, \
     request_hash, created_at, started_at, finished_at";

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        id: r.get(0)?,
        user_id: r.get(1)?,
        kind: r.get(2)?,
        queue: r.get(3)?,
        status: r.get(4)?,
        priority: r.get(5)?,
        payload: r.get(6)?,
        result: r.get(7)?,
        error: r.get(8)?,
        attempt: r.get(9)?,
        max_attempts: r.get(10)?,
        budget: r.get(11)?,
        run_at: r.get(12)?,
        lease_until: r.get(13)?,
        cancel_requested: r.get(14)?,
        progress_pct: r.get::<_, i64>(15)?.clamp(0, 100) as u8,
        progress_msg: r.get(16)?,
        request_hash: r.get(17)?,
        created_at: r.get(18)?,
        started_at: r.get(19)?,
        finished_at: r.get(20)?,
    })
}

pub fn get_job(conn: &Connection, id: &str) -> Result<Option<JobRow>, StorageError> {
    Ok(conn
        .prepare_cached(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"))?
        .query_row([id], job_from_row)
        .optional()?)
}

pub fn find_by_idempotency_key(
    conn: &Connection,
    user_id: &str,
    key: &str,
) -> Result<Option<JobRow>, StorageError> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE user_id = ?1 AND idempotency_key = ?2"
        ))?
        .query_row([user_id, key], job_from_row)
        .optional()?)
}

/// The user's active jobs (queued, running, retrying): one row of `job_active`, which
/// triggers keep exact on every insert, status change and delete (migration 0005).
pub fn count_active(conn: &Connection, user_id: &str) -> Result<u64, StorageError> {
    let n: Option<i64> = conn
        .prepare_cached("SELECT active FROM job_active WHERE user_id = ?1")?
        .query_row([user_id], |r| r.get(0))
        .optional()?;
    Ok(n.map_or(0, |n| u64::try_from(n).unwrap_or(0)))
}

/// Jobs a user submitted since `since` (the plan's period quota).
pub fn count_created_since(
    conn: &Connection,
    user_id: &str,
    since: Millis,
) -> Result<u64, StorageError> {
    // Ids are UUIDv7, so `created_at >= since` is a range on the (user_id, id) index.
    let lower = crate::ids::id_floor_for_millis(since);
    Ok(conn
        .prepare_cached("SELECT COUNT(*) FROM jobs WHERE user_id = ?1 AND id >= ?2")?
        .query_row(params![user_id, lower], |r| r.get(0))?)
}

/// Jobs `user_id` created since `period_start`: the `job_usage` row when it is for this
/// period, else an exact count of the user's jobs (once per period: the caller stores
/// it back with [`set_period_usage`]).
pub fn period_usage(
    conn: &Connection,
    user_id: &str,
    period_start: Millis,
) -> Result<u64, StorageError> {
    let row: Option<(i64, i64)> = conn
        .prepare_cached("SELECT period_start, jobs FROM job_usage WHERE user_id = ?1")?
        .query_row(params![user_id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match row {
        Some((start, jobs)) if start == period_start => Ok(u64::try_from(jobs).unwrap_or(0)),
        _ => count_created_since(conn, user_id, period_start),
    }
}

/// Records `jobs` as the user's usage in the period starting at `period_start`. Call in
/// the transaction that inserted the job, with [`period_usage`] + 1.
pub fn set_period_usage(
    conn: &Connection,
    user_id: &str,
    period_start: Millis,
    jobs: u64,
) -> Result<(), StorageError> {
    conn.prepare_cached(
        "INSERT INTO job_usage (user_id, period_start, jobs) VALUES (?1, ?2, ?3)
         ON CONFLICT (user_id) DO UPDATE SET period_start = excluded.period_start,
                                             jobs = excluded.jobs",
    )?
    .execute(params![
        user_id,
        period_start,
        i64::try_from(jobs).unwrap_or(i64::MAX)
    ])?;
    Ok(())
}

/// Where a queue's round-robin over job owners stands, kept by the caller between claims.
/// The owners of a queue's waiting jobs take turns in a fixed cycle: internal jobs (no
/// user) first, then users by id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Turn {
    /// The next cycle starts with internal jobs.
    #[default]
    Start,
    /// Internal jobs were served last; users come next.
    AfterInternal,
    /// This user was served last; the next user by id comes next.
    After(String),
}

/// Who owns a group of waiting jobs: a user, or None for internal jobs.
type Owner = Option<String>;

/// The first user by id after `?2` with waiting jobs in queue `?1`: one index seek.
const NEXT_OWNER: &str = "SELECT MIN(user_id) FROM jobs
     WHERE queue = ?1 AND status IN ('queued', 'retrying') AND user_id > ?2";

/// Whether queue `?1` has waiting internal jobs: one index seek.
const HAS_INTERNAL: &str = "SELECT EXISTS (SELECT 1 FROM jobs
     WHERE queue = ?1 AND status IN ('queued', 'retrying') AND user_id IS NULL)";

/// The highest priority below `?3` among the waiting jobs of owner `?2` (NULL: internal)
/// in queue `?1`: one index seek.
const NEXT_PRIORITY: &str = "SELECT MAX(priority) FROM jobs
     WHERE queue = ?1 AND status IN ('queued', 'retrying') AND user_id IS ?2 AND priority < ?3";

/// Calls `f` with each priority that has waiting jobs of `owner` in `queue`, highest
/// first, one index seek each, until `f` breaks. `jobs_claim` is ordered by (queue,
/// user_id, priority DESC, run_at), so under each priority the jobs are in run_at order and
/// `f` can seek too.
fn each_waiting_priority(
    conn: &Connection,
    queue: &str,
    owner: Option<&str>,
    mut f: impl FnMut(i64) -> Result<ControlFlow<()>, StorageError>,
) -> Result<(), StorageError> {
    let mut next_priority = conn.prepare_cached(NEXT_PRIORITY)?;
    let mut below = i64::MAX;
    while let Some(priority) =
        next_priority.query_row(params![queue, owner, below], |r| r.get::<_, Option<i64>>(0))?
    {
        if f(priority)?.is_break() {
            break;
        }
        below = priority;
    }
    Ok(())
}

/// Runnable jobs of one owner and priority in run_at order: a range at the start of that
/// part of `jobs_claim`.
const DUE_AT_PRIORITY: &str = "SELECT id FROM jobs
     WHERE queue = ?1 AND status IN ('queued', 'retrying') AND user_id IS ?2 AND priority = ?3
       AND run_at <= ?4
     ORDER BY run_at LIMIT ?5";

/// Up to `limit` runnable jobs of `owner` in `queue`, by priority then run_at: a seek per
/// waiting priority of that owner and a range each, however many are scheduled later.
fn due_of_owner(
    conn: &Connection,
    queue: &str,
    owner: Option<&str>,
    now: Millis,
    limit: usize,
) -> Result<Vec<String>, StorageError> {
    let mut ids = Vec::new();
    let mut due = conn.prepare_cached(DUE_AT_PRIORITY)?;
    each_waiting_priority(conn, queue, owner, |priority| {
        let left = limit - ids.len();
        let mut rows = due.query(params![queue, owner, priority, now, left as i64])?;
        while let Some(r) = rows.next()? {
            ids.push(r.get(0)?);
        }
        Ok(if ids.len() < limit {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(())
        })
    })?;
    Ok(ids)
}

/// Owners visited in one claim beyond its limit before it stops looking (owners whose
/// waiting jobs are all scheduled for later cost a visit and give nothing). The turn
/// moves past them, so the next claim goes on from there.
const EXTRA_OWNER_VISITS: usize = 64;

/// Calls `f` with each owner of waiting jobs in `queue`, one cycle in turn order starting
/// after `turn`, until `f` breaks; sets `turn` to the last owner visited. One index seek
/// per owner.
fn each_owner_in_turn(
    conn: &Connection,
    queue: &str,
    turn: &mut Turn,
    mut f: impl FnMut(Option<&str>) -> Result<ControlFlow<()>, StorageError>,
) -> Result<(), StorageError> {
    let mut next_owner = conn.prepare_cached(NEXT_OWNER)?;
    let mut has_internal = conn.prepare_cached(HAS_INTERNAL)?;
    // The next candidate: the internal jobs (None), or the first user after this id.
    let mut at: Option<String> = match turn {
        Turn::Start => None,
        Turn::AfterInternal => Some(String::new()),
        Turn::After(u) => Some(u.clone()),
    };
    let mut internal_seen = false;
    let mut first_user: Option<String> = None;
    loop {
        let owner: Owner = match at.take() {
            None => {
                if internal_seen {
                    return Ok(());
                }
                internal_seen = true;
                at = Some(String::new());
                if !has_internal.query_row([queue], |r| r.get::<_, bool>(0))? {
                    continue;
                }
                *turn = Turn::AfterInternal;
                None
            }
            Some(after) => {
                let next: Option<String> =
                    next_owner.query_row(params![queue, after], |r| r.get(0))?;
                match next {
                    // Back at the first user of this cycle: every owner had a turn.
                    Some(u) if first_user.as_deref() == Some(u.as_str()) => return Ok(()),
                    Some(u) => {
                        first_user.get_or_insert_with(|| u.clone());
                        at = Some(u.clone());
                        *turn = Turn::After(u.clone());
                        Some(u)
                    }
                    // Past the last user: the internal jobs are next.
                    None if internal_seen && first_user.is_none() => return Ok(()),
                    None => {
                        at = None;
                        continue;
                    }
                }
            }
        };
        if f(owner.as_deref())?.is_break() {
            return Ok(());
        }
    }
}

/// Marks the waiting jobs whose ids are in the JSON array `?1` running for worker `?4`
/// with a lease until `?3`: each id one seek of the primary key.
const TAKE: &str = "UPDATE jobs SET status = 'running', attempt = attempt + 1, lease_until = ?3,
            worker = ?4, started_at = ?2, finished_at = NULL, updated_at = ?2
     WHERE id IN (SELECT value FROM json_each(?1))
       AND (status = 'queued' OR status = 'retrying')";

/// Claims up to `limit` runnable jobs of `queue` for this worker, setting running, lease
/// and attempt; returned in claim order. Fair across owners: every owner with runnable jobs
/// gets one before any gets a second (round-robin from `turn`, which the caller keeps per
/// queue), and the slots left are shared out evenly. Priority orders jobs only within
/// their owner's own jobs, so no user's backlog or priority starves another user.
///
/// Cost follows the jobs claimed, the owners visited and their priorities in use, never
/// the backlog: each owner is one seek of `jobs_claim` (queue, user_id, priority DESC,
/// run_at), each of its waiting priorities one more, and its due jobs a range.
pub fn claim(
    conn: &Connection,
    queue: &str,
    limit: u32,
    now: Millis,
    lease_until: Millis,
    worker: &str,
    turn: &mut Turn,
) -> Result<Vec<JobRow>, StorageError> {
    let limit = limit as usize;
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut ids: Vec<String> = Vec::with_capacity(limit);
    // One job of each owner in turn.
    let mut served: Vec<(Owner, String)> = Vec::new();
    let mut visits = 0;
    each_owner_in_turn(conn, queue, turn, |owner| {
        visits += 1;
        if let Some(id) = due_of_owner(conn, queue, owner, now, 1)?.pop() {
            served.push((owner.map(str::to_string), id.clone()));
            ids.push(id);
        }
        Ok(
            if ids.len() >= limit || visits >= limit + EXTRA_OWNER_VISITS {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            },
        )
    })?;
    // The slots left, shared evenly among the owners served (in turn order); what an
    // owner cannot use goes to the others in the next round. Every owner's due jobs come
    // in the same order within this transaction, so an owner that has given `n` gives its
    // next ones by skipping `n`. Each round fills the slots or runs an owner dry.
    let mut left = limit - ids.len();
    let mut taken: Vec<(Owner, usize)> = served.into_iter().map(|(o, _)| (o, 1)).collect();
    while left > 0 && !taken.is_empty() {
        let mut i = 0;
        while i < taken.len() && left > 0 {
            let share = left.div_ceil(taken.len() - i);
            let (owner, n) = &mut taken[i];
            let more: Vec<String> = due_of_owner(conn, queue, owner.as_deref(), now, *n + share)?
                .into_iter()
                .skip(*n)
                .collect();
            left -= more.len();
            *n += more.len();
            if more.len() < share {
                taken.remove(i);
            } else {
                i += 1;
            }
            ids.extend(more);
        }
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    // One UPDATE for the whole claim. Every statement that fires the jobs triggers first
    // copies each page it touches into a statement journal, so one UPDATE per job copied
    // the same few pages once per job (≈ 40% of the claim's cost at 64 jobs).
    let list = serde_json::Value::from(ids.clone()).to_string();
    let mut take = conn.prepare_cached(&format!("{TAKE} RETURNING {JOB_COLS}"))?;
    let mut rows = take
        .query_map(params![list, now, lease_until, worker], job_from_row)?
        .collect::<Result<Vec<_>, _>>()?;
    // RETURNING has no defined order: put the rows back in claim order.
    let order: std::collections::HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    rows.sort_by_key(|r| order.get(r.id.as_str()).copied().unwrap_or(usize::MAX));
    Ok(rows)
}

/// The earliest `run_at` among the waiting jobs of one owner and priority: one seek.
const FIRST_AT_PRIORITY: &str = "SELECT MIN(run_at) FROM jobs
     WHERE queue = ?1 AND status IN ('queued', 'retrying') AND user_id IS ?2 AND priority = ?3";

/// Owners [`next_run_at`] looks at before it answers with what it found.
const NEXT_RUN_OWNERS: usize = 256;

/// When the next job of `queue` becomes runnable, if any is waiting.
///
/// An idle dispatcher asks this every time it runs out of work. A plain `MIN(run_at)`
/// over `jobs_claim` reads every waiting job of the queue (≈ 45 ms with 200k scheduled
/// jobs, on each wake); this takes the earliest of each owner's waiting priorities
/// instead, one seek each. Past [`NEXT_RUN_OWNERS`] owners it answers with the earliest
/// found so far: the dispatcher polls at least once a second anyway.
pub fn next_run_at(conn: &Connection, queue: &str) -> Result<Option<Millis>, StorageError> {
    let mut first = conn.prepare_cached(FIRST_AT_PRIORITY)?;
    let mut earliest: Option<Millis> = None;
    let mut owners = 0;
    each_owner_in_turn(conn, queue, &mut Turn::Start, |owner| {
        each_waiting_priority(conn, queue, owner, |priority| {
            let at: Option<Millis> =
                first.query_row(params![queue, owner, priority], |r| r.get(0))?;
            earliest = earliest.into_iter().chain(at).min();
            Ok(ControlFlow::Continue(()))
        })?;
        owners += 1;
        Ok(if owners >= NEXT_RUN_OWNERS {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        })
    })?;
    Ok(earliest)
}

/// How an attempt ended, as the worker decided it.
#[derive(Debug, Clone)]
pub enum Finish<'a> {
    Succeeded {
        result: &'a str,
    },
    Retry {
        error: &'a str,
        run_at: Millis,
        outcome: &'a str,
    },
    Dead {
        error: &'a str,
        outcome: &'a str,
    },
    Canceled {
        error: Option<&'a str>,
    },
}

/// The column values a [`Finish`] writes.
struct Columns<'a> {
    status: JobStatus,
    result: Option<&'a str>,
    error: Option<&'a str>,
    run_at: Option<Millis>,
    outcome: &'a str,
    pct: Option<i64>,
}

impl<'a> Finish<'a> {
    fn columns(&self) -> Columns<'a> {
        let base = Columns {
            status: JobStatus::Dead,
            result: None,
            error: None,
            run_at: None,
            outcome: "",
            pct: None,
        };
        match *self {
            Finish::Succeeded { result } => Columns {
                status: JobStatus::Succeeded,
                result: Some(result),
                outcome: "succeeded",
                pct: Some(100),
                ..base
            },
            Finish::Retry {
                error,
                run_at,
                outcome,
            } => Columns {
                status: JobStatus::Retrying,
                error: Some(error),
                run_at: Some(run_at),
                outcome,
                ..base
            },
            Finish::Dead { error, outcome } => Columns {
                status: JobStatus::Dead,
                error: Some(error),
                outcome,
                ..base
            },
            Finish::Canceled { error } => Columns {
                status: JobStatus::Canceled,
                error,
                outcome: "canceled",
                ..base
            },
        }
    }
}

/// Records the end of attempt `attempt`, with the attempt's latest unsaved progress if
/// any (a success always ends at 100%). Fenced by (status running, attempt): if the job
/// was rescued or canceled meanwhile, nothing changes and `Ok(false)` is returned.
pub fn finish(
    conn: &Connection,
    id: &str,
    attempt: u32,
    started_at: Millis,
    how: &Finish<'_>,
    progress: Option<(u8, &str)>,
    now: Millis,
) -> Result<bool, StorageError> {
    let Columns {
        status,
        result,
        error,
        run_at,
        outcome,
        pct,
    } = how.columns();
    let terminal = status.is_terminal();
    let pct = pct.or(progress.map(|(p, _)| i64::from(p)));
    let msg = progress.map(|(_, m)| m);
    let changed =
        conn.prepare_cached(
            "UPDATE jobs SET status = ?3, result = ?4, error = ?5,
                    run_at = COALESCE(?6, run_at), lease_until = NULL, worker = NULL,
                    finished_at = CASE WHEN ?7 THEN ?8 ELSE NULL END,
                    progress_pct = COALESCE(?9, progress_pct),
                    progress_msg = COALESCE(?10, progress_msg), updated_at = ?8
             WHERE id = ?1 AND attempt = ?2 AND status = 'running'",
        )?
        .execute(params![
            id, attempt, status, result, error, run_at, terminal, now, pct, msg
        ])? == 1;
    if changed {
        record_attempt(conn, id, attempt, started_at, now, outcome, error)?;
    }
    Ok(changed)
}

/// One attempt's end, for [`finish_many`].
#[derive(Debug, Clone)]
pub struct AttemptEnd<'a> {
    pub id: &'a str,
    pub attempt: u32,
    pub started_at: Millis,
    pub how: Finish<'a>,
    pub progress: Option<(u8, &'a str)>,
}

/// Attempt ends per statement in [`finish_many`]; a short last chunk is padded with rows
/// that match nothing, so there is one statement of each kind to prepare.
const FINISH_CHUNK: usize = 16;
/// Values per attempt end in [`finish_many_sql`]'s UPDATE and INSERT.
const FINISH_COLS: usize = 9;
const ATTEMPT_COLS: usize = 5;

/// [`finish`] for many attempts: one UPDATE for the jobs and one INSERT for their attempt
/// rows per [`FINISH_CHUNK`] ends, each the same as [`finish`] writes. A statement that
/// fires triggers or may abort part way (the `job_active` triggers, foreign keys, OR
/// REPLACE) first copies every page it touches into a statement journal, so one statement
/// per job copied the same few pages once per job. Returns, per end, whether it was
/// recorded (false: the job was rescued or canceled meanwhile).
pub fn finish_many(
    conn: &Connection,
    ends: &[AttemptEnd<'_>],
    now: Millis,
) -> Result<Vec<bool>, StorageError> {
    use rusqlite::types::{ToSqlOutput, Value};
    static SQL: std::sync::LazyLock<(String, String)> = std::sync::LazyLock::new(finish_many_sql);
    let mut update = conn.prepare_cached(&SQL.0)?;
    let mut insert = conn.prepare_cached(&SQL.1)?;
    let mut recorded = Vec::with_capacity(ends.len());
    for chunk in ends.chunks(FINISH_CHUNK) {
        let mut values: Vec<ToSqlOutput<'_>> = Vec::with_capacity(FINISH_CHUNK * FINISH_COLS + 1);
        for e in chunk {
            let c = e.how.columns();
            let pct = c.pct.or(e.progress.map(|(p, _)| i64::from(p)));
            values.extend([
                ToSqlOutput::from(e.id),
                ToSqlOutput::from(e.attempt),
                ToSqlOutput::from(c.status.as_str()),
                c.result
                    .map_or(ToSqlOutput::Owned(Value::Null), ToSqlOutput::from),
                c.error
                    .map_or(ToSqlOutput::Owned(Value::Null), ToSqlOutput::from),
                c.run_at
                    .map_or(ToSqlOutput::Owned(Value::Null), ToSqlOutput::from),
                ToSqlOutput::from(c.status.is_terminal()),
                pct.map_or(ToSqlOutput::Owned(Value::Null), ToSqlOutput::from),
                e.progress
                    .map_or(ToSqlOutput::Owned(Value::Null), |(_, m)| {
                        ToSqlOutput::from(m)
                    }),
            ]);
        }
        values.resize_with(FINISH_CHUNK * FINISH_COLS, || {
            ToSqlOutput::Owned(Value::Null)
        });
        values.push(ToSqlOutput::from(now));
        let changed: Vec<String> = update
            .query_map(rusqlite::params_from_iter(values), |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut attempts: Vec<ToSqlOutput<'_>> =
            Vec::with_capacity(FINISH_CHUNK * ATTEMPT_COLS + 1);
        for e in chunk {
            let ok = changed.iter().any(|id| id == e.id);
            recorded.push(ok);
            if ok {
                let c = e.how.columns();
                attempts.extend([
                    ToSqlOutput::from(e.id),
                    ToSqlOutput::from(e.attempt),
                    ToSqlOutput::from(e.started_at),
                    ToSqlOutput::from(c.outcome),
                    c.error
                        .map_or(ToSqlOutput::Owned(Value::Null), ToSqlOutput::from),
                ]);
            }
        }
        if !attempts.is_empty() {
            attempts.resize_with(FINISH_CHUNK * ATTEMPT_COLS, || {
                ToSqlOutput::Owned(Value::Null)
            });
            attempts.push(ToSqlOutput::from(now));
            insert.execute(rusqlite::params_from_iter(attempts))?;
        }
    }
    Ok(recorded)
}

/// [`finish_many`]'s UPDATE and INSERT over [`FINISH_CHUNK`] rows of values (padding rows
/// are all NULL: their id matches no job and the INSERT skips them); `now` is the last
/// parameter.
fn finish_many_sql() -> (String, String) {
    let rows = |cols: usize| {
        (0..FINISH_CHUNK)
            .map(|r| {
                let vals: Vec<String> = (1..=cols).map(|c| format!("?{}", r * cols + c)).collect();
                format!("({})", vals.join(", "))
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let now = FINISH_CHUNK * FINISH_COLS + 1;
    // Columns: id, attempt, status, result, error, run_at, terminal, pct, msg.
    let update = format!(
        "UPDATE jobs SET status = e.column3, result = e.column4, error = e.column5,
                run_at = COALESCE(e.column6, jobs.run_at), lease_until = NULL, worker = NULL,
                finished_at = CASE WHEN e.column7 THEN ?{now} ELSE NULL END,
                progress_pct = COALESCE(e.column8, jobs.progress_pct),
                progress_msg = COALESCE(e.column9, jobs.progress_msg), updated_at = ?{now}
         FROM (VALUES {}) AS e
         WHERE jobs.id = e.column1 AND jobs.attempt = e.column2 AND jobs.status = 'running'
         RETURNING jobs.id",
        rows(FINISH_COLS)
    );
    let now = FINISH_CHUNK * ATTEMPT_COLS + 1;
    // Columns: id, attempt, started_at, outcome, error.
    let insert = format!(
        "INSERT OR REPLACE INTO job_attempts
             (job_id, attempt, started_at, finished_at, outcome, error)
         SELECT column1, column2, column3, ?{now}, column4, column5
         FROM (VALUES {}) WHERE column1 IS NOT NULL",
        rows(ATTEMPT_COLS)
    );
    (update, insert)
}

fn record_attempt(
    conn: &Connection,
    id: &str,
    attempt: u32,
    started_at: Millis,
    now: Millis,
    outcome: &str,
    error: Option<&str>,
) -> Result<(), StorageError> {
    conn.prepare_cached(
        "INSERT OR REPLACE INTO job_attempts (job_id, attempt, started_at, finished_at, outcome, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![id, attempt, started_at, now, outcome, error])?;
    Ok(())
}

#[derive(Debug, Clone)]
pub struct AttemptRow {
    pub attempt: u32,
    pub started_at: Millis,
    pub finished_at: Millis,
    pub outcome: String,
    pub error: Option<String>,
}

pub fn attempts(conn: &Connection, id: &str) -> Result<Vec<AttemptRow>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT attempt, started_at, finished_at, outcome, error FROM job_attempts
         WHERE job_id = ?1 ORDER BY attempt",
    )?;
    let rows = stmt
        .query_map([id], |r| {
            Ok(AttemptRow {
                attempt: r.get(0)?,
                started_at: r.get(1)?,
                finished_at: r.get(2)?,
                outcome: r.get(3)?,
                error: r.get(4)?,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Cancels a job that has not started (queued or waiting to retry): `Some(row)` if done.
pub fn cancel_waiting(
    conn: &Connection,
    id: &str,
    now: Millis,
) -> Result<Option<JobRow>, StorageError> {
    Ok(conn
        .prepare_cached(&format!(
            "UPDATE jobs SET status = 'canceled', finished_at = ?2, updated_at = ?2,
                    error = COALESCE(error, 'canceled before it ran')
             WHERE id = ?1 AND status IN ('queued', 'retrying')
             RETURNING {JOB_COLS}"
        ))?
        .query_row(params![id, now], job_from_row)
        .optional()?)
}

/// Marks a running job for cancellation; the worker running it ends it as `canceled`.
pub fn request_cancel(conn: &Connection, id: &str, now: Millis) -> Result<bool, StorageError> {
    Ok(conn.execute(
        "UPDATE jobs SET cancel_requested = 1, updated_at = ?2 WHERE id = ?1 AND status = 'running'",
        params![id, now],
    )? == 1)
}

/// Puts a dead or canceled job back in the queue with a fresh budget of attempts;
/// `attempt` keeps counting so the history stays intact.
pub fn retry(conn: &Connection, id: &str, now: Millis) -> Result<Option<JobRow>, StorageError> {
    Ok(conn
        .prepare_cached(&format!(
            "UPDATE jobs SET status = 'queued', max_attempts = attempt + budget, run_at = ?2,
                    error = NULL, result = NULL, finished_at = NULL, cancel_requested = 0,
                    progress_pct = 0, progress_msg = NULL, updated_at = ?2
             WHERE id = ?1 AND status IN ('dead', 'canceled')
             RETURNING {JOB_COLS}"
        ))?
        .query_row(params![id, now], job_from_row)
        .optional()?)
}

/// Deletes a dead job (discard from the dead-letter queue).
pub fn discard_dead(conn: &Connection, id: &str) -> Result<bool, StorageError> {
    Ok(conn.execute("DELETE FROM jobs WHERE id = ?1 AND status = 'dead'", [id])? == 1)
}

/// Extends the lease of jobs this process is running.
pub fn extend_leases(
    conn: &Connection,
    ids: &[String],
    lease_until: Millis,
    now: Millis,
) -> Result<(), StorageError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE jobs SET lease_until = ?2, updated_at = ?3 WHERE id = ?1 AND status = 'running'",
    )?;
    for id in ids {
        stmt.execute(params![id, lease_until, now])?;
    }
    Ok(())
}

/// Re-queues running jobs whose lease ends before `lease_before` and that `alive` does
/// not claim (a crashed process's jobs). Jobs out of attempts go to the dead-letter queue.
/// Returns the ids re-queued and the ids made dead.
pub fn rescue_expired(
    conn: &Connection,
    lease_before: Millis,
    now: Millis,
    alive: &dyn Fn(&str) -> bool,
) -> Result<(Vec<String>, Vec<String>), StorageError> {
    let expired: Vec<(String, u32, u32, Millis)> = conn
        .prepare_cached(
            "SELECT id, attempt, max_attempts, COALESCE(started_at, created_at) FROM jobs
             WHERE status = 'running' AND lease_until < ?1",
        )?
        .query_map([lease_before], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut requeued = Vec::new();
    let mut dead = Vec::new();
    for (id, attempt, max_attempts, started) in expired {
        if alive(&id) {
            continue;
        }
        let error = "the worker stopped before the attempt finished (crash or kill)";
        let status = if attempt >= max_attempts {
            JobStatus::Dead
        } else {
            JobStatus::Queued
        };
        conn.execute(
            "UPDATE jobs SET status = ?2, lease_until = NULL, worker = NULL, run_at = ?3,
                    error = ?4, updated_at = ?3,
                    finished_at = CASE WHEN ?2 = 'dead' THEN ?3 ELSE NULL END
             WHERE id = ?1 AND status = 'running'",
            params![id, status, now, error],
        )?;
        record_attempt(conn, &id, attempt, started, now, "interrupted", Some(error))?;
        if status == JobStatus::Dead {
            dead.push(id);
        } else {
            requeued.push(id);
        }
    }
    Ok((requeued, dead))
}

/// Gives back jobs this process was running when it shut down gracefully: they return to
/// the queue without spending the interrupted attempt.
pub fn release(conn: &Connection, ids: &[String], now: Millis) -> Result<usize, StorageError> {
    let mut stmt = conn.prepare_cached(
        "UPDATE jobs SET status = 'queued', attempt = MAX(attempt - 1, 0), lease_until = NULL,
                worker = NULL, run_at = ?2, updated_at = ?2
         WHERE id = ?1 AND status = 'running'",
    )?;
    let mut n = 0;
    for id in ids {
        n += stmt.execute(params![id, now])?;
    }
    Ok(n)
}

/// Stores the latest progress of a running job (at most once a second per job).
pub fn save_progress(
    conn: &Connection,
    id: &str,
    pct: u8,
    msg: &str,
    now: Millis,
) -> Result<(), StorageError> {
    conn.prepare_cached(
        "UPDATE jobs SET progress_pct = ?2, progress_msg = ?3, updated_at = ?4
         WHERE id = ?1 AND status = 'running'",
    )?
    .execute(params![id, pct, msg, now])?;
    Ok(())
}

pub struct ListFilter<'a> {
    /// None: every user's jobs (admin).
    pub user_id: Option<&'a str>,
    pub status: Option<JobStatus>,
    pub kind: Option<&'a str>,
    /// Return jobs with ids below this (newest first).
    pub before_id: Option<&'a str>,
    pub limit: u32,
}

/// Newest first; ids are time-ordered so `before_id` is a stable cursor.
///
/// The WHERE clause names only the filters given, so SQLite can walk the index that
/// serves them in id order: `jobs_user` for one user's jobs, `jobs_dead` for the
/// dead-letter queue, the primary key otherwise. (`?n IS NULL OR col = ?n` would read
/// every row, as plans do not depend on bound values.)
pub fn list(conn: &Connection, f: &ListFilter<'_>) -> Result<Vec<JobRow>, StorageError> {
    let mut sql = format!("SELECT {JOB_COLS} FROM jobs WHERE 1");
    if f.user_id.is_some() {
        sql.push_str(" AND user_id = ?1");
    }
    match f.status {
        // A literal, so the partial index `jobs_dead` (WHERE status = 'dead') applies.
        Some(JobStatus::Dead) => sql.push_str(" AND status = 'dead'"),
        Some(_) => sql.push_str(" AND status = ?2"),
        None => {}
    }
    if f.kind.is_some() {
        sql.push_str(" AND kind = ?3");
    }
    if f.before_id.is_some() {
        sql.push_str(" AND id < ?4");
    }
    // Every variant names ?5, so all five values can be bound whichever appear.
    sql.push_str(" ORDER BY id DESC LIMIT ?5");
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt
        .query_map(
            params![f.user_id, f.status, f.kind, f.before_id, f.limit],
            job_from_row,
        )?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Job counts by (queue, status), for the `jobs` gauge.
pub type Counts = Vec<(String, String, u64)>;

/// The statuses counted through a partial index: each query reads only the jobs in them
/// (the backlog, the running jobs, the dead-letter queue), however many jobs have ended.
const INDEXED_COUNTS: [&str; 3] = [
    "SELECT queue, status, COUNT(*) FROM jobs
     WHERE status IN ('queued', 'retrying') GROUP BY queue, status",
    "SELECT queue, 'running', COUNT(*) FROM jobs WHERE status = 'running' GROUP BY queue",
    "SELECT queue, 'dead', COUNT(*) FROM jobs WHERE status = 'dead' GROUP BY queue",
];

/// Succeeded and canceled jobs: no index covers them, so this reads the whole table
/// (0.6–1.3 s at a million jobs, warm or cold cache). Callers run it rarely.
const ENDED_COUNTS: &str = "SELECT queue, status, COUNT(*) FROM jobs
     WHERE status = 'succeeded' OR status = 'canceled' GROUP BY queue, status";

/// Counts of the queued, retrying, running and dead jobs: cheap, see [`INDEXED_COUNTS`].
pub fn counts_indexed(conn: &Connection) -> Result<Counts, StorageError> {
    let mut out = Vec::new();
    for sql in INDEXED_COUNTS {
        let mut stmt = conn.prepare_cached(sql)?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        for row in rows {
            out.push(row?);
        }
    }
    Ok(out)
}

/// Counts of the succeeded and canceled jobs: a full scan, see [`ENDED_COUNTS`].
pub fn counts_ended(conn: &Connection) -> Result<Counts, StorageError> {
    let mut stmt = conn.prepare_cached(ENDED_COUNTS)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Deletes finished jobs that ended before `before`; returns how many.
pub fn purge_finished(
    conn: &Connection,
    before: Millis,
    limit: u32,
) -> Result<usize, StorageError> {
    // `finished_at` is set exactly when a job ends; the status test is a second guard.
    Ok(conn.execute(
        "DELETE FROM jobs WHERE id IN (
             SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?1
               AND (status = 'succeeded' OR status = 'canceled' OR status = 'dead')
             LIMIT ?2)",
        params![before, limit],
    )?)
}

// Uploads and the `meta` table moved to `storage::uploads` and `storage::meta`; these
// old paths stay until every caller has moved (black-box tests, code in other branches
// of issue #17).
pub use super::meta::{get as meta_get, set as meta_set};
pub use super::uploads::{
    UploadRow, delete_upload, get_upload, insert_upload, stored_bytes, upload_in_use,
    uploads_stored_before,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn db_with_user() -> Connection {
        let mut c = Connection::open_in_memory().expect("open");
        crate::storage::migrate::apply(&mut c).expect("migrate");
        crate::storage::users::insert_user(
            &c,
            &crate::storage::users::NewUser {
                id: "u1",
                email: "u1@example.com",
                email_verified: true,
                name: None,
                password_hash: None,
                role: None,
                now: 0,
            },
        )
        .expect("user");
        c
    }

    fn job_at(c: &Connection, ms: Millis) {
        job_with_id(c, &crate::ids::new_id_at(ms), ms);
    }

    fn job_with_id(c: &Connection, id: &str, ms: Millis) {
        insert_job(
            c,
            &NewJob {
                id,
                user_id: Some("u1"),
                kind: "demo",
                queue: "fast",
                priority: 0,
                payload: "{}",
                max_attempts: 1,
                run_at: ms,
                idempotency_key: None,
                request_hash: None,
                now: ms,
            },
        )
        .expect("job");
    }

    #[test]
    fn period_usage_counts_once_then_follows_the_counter_and_recounts_on_a_new_period() {
        let c = db_with_user();
        let (t1, t2, t3) = (1_700_000_000_000, 1_700_000_100_000, 1_700_000_200_000);
        job_at(&c, t1);
        job_at(&c, t2);
        job_at(&c, t3);
        // No row yet: an exact count of the jobs since the period start.
        assert_eq!(period_usage(&c, "u1", t2).expect("usage"), 2);
        // The counter is the truth for its period (purged jobs stay counted).
        set_period_usage(&c, "u1", t2, 5).expect("set");
        assert_eq!(period_usage(&c, "u1", t2).expect("usage"), 5);
        // Another period start: counted again from the jobs, and the row is replaced.
        assert_eq!(period_usage(&c, "u1", t3).expect("usage"), 1);
        set_period_usage(&c, "u1", t3, 2).expect("set");
        assert_eq!(period_usage(&c, "u1", t3).expect("usage"), 2);
        let rows: i64 = c
            .query_row("SELECT COUNT(*) FROM job_usage", [], |r| r.get(0))
            .expect("rows");
        assert_eq!(rows, 1);
    }

    /// A deterministic pseudo-random sequence for the randomised walks below.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    fn active_by_count(c: &Connection) -> i64 {
        c.query_row(
            "SELECT COUNT(*) FROM jobs WHERE user_id = 'u1'
             AND status IN ('queued', 'running', 'retrying')",
            [],
            |r| r.get(0),
        )
        .expect("count")
    }

    #[test]
    fn the_active_counter_follows_every_insert_status_change_and_delete() {
        let c = db_with_user();
        let statuses = JobStatus::ALL;
        // A deterministic walk over many transitions, checked after every step.
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for step in 0..400_i64 {
            let ids: Vec<String> = c
                .prepare("SELECT id FROM jobs")
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .expect("ids");
            match next() % 4 {
                0 | 1 if !ids.is_empty() => {
                    let id = &ids[(next() % ids.len() as u64) as usize];
                    let to = statuses[(next() % statuses.len() as u64) as usize];
                    c.execute("UPDATE jobs SET status = ?2 WHERE id = ?1", params![id, to])
                        .expect("update");
                }
                2 if !ids.is_empty() => {
                    let id = &ids[(next() % ids.len() as u64) as usize];
                    c.execute("DELETE FROM jobs WHERE id = ?1", [id])
                        .expect("delete");
                }
                _ => job_at(&c, 1_700_000_000_000 + step),
            }
            assert_eq!(
                count_active(&c, "u1").expect("active") as i64,
                active_by_count(&c),
                "after step {step}"
            );
        }
        // Claiming through the real query keeps it too.
        job_at(&c, 1_800_000_000_000);
        claim(
            &c,
            "fast",
            10,
            1_900_000_000_000,
            1_900_000_060_000,
            "w",
            &mut Turn::default(),
        )
        .expect("claim");
        assert_eq!(
            count_active(&c, "u1").expect("active") as i64,
            active_by_count(&c)
        );
    }

    /// A database migrated up to, not including, `migration`, with user `u1` (inserted by
    /// hand: the users code writes today's schema).
    fn db_before(migration: &str) -> Connection {
        use crate::storage::migrate;
        let mut c = Connection::open_in_memory().expect("open");
        c.pragma_update(None, "foreign_keys", true).expect("fk");
        let before: Vec<(&str, &str)> = migrate::MIGRATIONS
            .iter()
            .copied()
            .take_while(|(name, _)| *name != migration)
            .collect();
        migrate::apply_list(&mut c, &before).expect("old schema");
        c.execute(
            "INSERT INTO users (id, email, email_verified, role, token_version, disabled,
                                created_at, updated_at)
             VALUES ('u1', 'u1@example.com', 1, 'user', 0, 0, 0, 0)",
            [],
        )
        .expect("user");
        c
    }

    #[test]
    fn the_migration_counts_the_active_jobs_already_there() {
        let mut c = db_before("0005_job_counters");
        for (i, status) in ["queued", "running", "succeeded", "retrying", "dead"]
            .iter()
            .enumerate()
        {
            job_at(&c, 1_700_000_000_000 + i as i64);
            c.execute(
                "UPDATE jobs SET status = ?1 WHERE created_at = ?2",
                params![status, 1_700_000_000_000 + i as i64],
            )
            .expect("status");
        }
        crate::storage::migrate::apply(&mut c).expect("upgrade");
        assert_eq!(count_active(&c, "u1").expect("active"), 3);
    }
    /// `EXPLAIN QUERY PLAN` of `sql`, its parameters bound to NULL (plans do not depend on
    /// bound values: the connections run with QPSG).
    fn plan(c: &Connection, sql: &str) -> String {
        let rows: Vec<String> = c
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .and_then(|mut s| {
                let nulls = vec![rusqlite::types::Null; s.parameter_count()];
                s.query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))?
                    .collect()
            })
            .expect("plan");
        rows.join(" | ")
    }

    #[test]
    fn listing_claiming_and_purging_walk_their_indexes() {
        let c = db_with_user();
        let list_sql = |user: bool, status: Option<&str>| {
            let mut sql = String::from("SELECT id FROM jobs WHERE 1");
            if user {
                sql.push_str(" AND user_id = 'u1'");
            }
            match status {
                Some("dead") => sql.push_str(" AND status = 'dead'"),
                Some(s) => sql.push_str(&format!(" AND status = '{s}'")),
                None => {}
            }
            sql + " AND id < 'z' ORDER BY id DESC LIMIT 50"
        };
        let p = plan(&c, &list_sql(true, Some("succeeded")));
        assert!(p.contains("jobs_user"), "{p}");
        let p = plan(&c, &list_sql(false, Some("dead")));
        assert!(p.contains("jobs_dead"), "{p}");
        assert!(!p.contains("TEMP B-TREE"), "no sort: {p}");
        let p = plan(
            &c,
            "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < 5
               AND (status = 'succeeded' OR status = 'canceled' OR status = 'dead') LIMIT 10",
        );
        assert!(p.contains("jobs_finished"), "{p}");
        for sql in INDEXED_COUNTS {
            let p = plan(&c, sql);
            assert!(
                ["jobs_claim", "jobs_lease", "jobs_dead"]
                    .iter()
                    .any(|i| p.contains(&format!("USING INDEX {i}"))),
                "{p}"
            );
        }
        let p = plan(&c, TAKE);
        assert!(
            p.contains("SEARCH jobs USING INDEX sqlite_autoindex_jobs_1 (id=?)"),
            "{p}"
        );
        let p = plan(&c, NEXT_PRIORITY);
        assert!(
            p.contains("jobs_claim (queue=? AND user_id=? AND priority<?)"),
            "{p}"
        );
        let p = plan(&c, DUE_AT_PRIORITY);
        assert!(
            p.contains("jobs_claim (queue=? AND user_id=? AND priority=? AND run_at<?)"),
            "{p}"
        );
        assert!(!p.contains("TEMP B-TREE"), "no sort: {p}");
        let p = plan(&c, NEXT_OWNER);
        assert!(p.contains("jobs_claim (queue=? AND user_id>?)"), "{p}");
        let p = plan(&c, HAS_INTERNAL);
        assert!(p.contains("jobs_claim (queue=? AND user_id=?)"), "{p}");
    }

    #[test]
    fn the_gauge_counts_add_up_to_every_job_by_queue_and_status() {
        let c = db_with_user();
        for i in 0..40i64 {
            let t = 1_700_000_000_000 + i;
            job_at(&c, t);
            let status = JobStatus::ALL[(i % 6) as usize];
            let queue = if (i / 6) % 2 == 0 { "fast" } else { "slow" };
            c.execute(
                "UPDATE jobs SET status = ?1, queue = ?2,
                        lease_until = CASE WHEN ?1 = 'running' THEN ?3 END,
                        finished_at = CASE WHEN ?1 IN ('succeeded', 'dead', 'canceled')
                                           THEN ?3 END
                 WHERE created_at = ?3",
                params![status, queue, t],
            )
            .expect("status");
        }
        let mut all: Counts = c
            .prepare("SELECT queue, status, COUNT(*) FROM jobs GROUP BY queue, status")
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect()
            })
            .expect("all");
        let mut parts = counts_indexed(&c).expect("indexed");
        parts.extend(counts_ended(&c).expect("ended"));
        all.sort();
        parts.sort();
        assert_eq!(parts, all);
        assert_eq!(all.len(), 12, "both queues in every status: {all:?}");
    }

    /// `n` jobs `j0`… of which all but the last two are running (claimed); of those two,
    /// one was rescued and claimed again (its attempt is 2), one is still queued.
    fn db_with_running_jobs(n: usize) -> (Connection, Vec<String>) {
        let c = db_with_user();
        let ids: Vec<String> = (0..n).map(|i| format!("j{i:03}")).collect();
        for (i, id) in ids.iter().enumerate() {
            job_with_id(&c, id, 1_700_000_000_000 + i as i64);
        }
        let claimed = claim(
            &c,
            "fast",
            n as u32 - 1,
            1_800_000_000_000,
            1_800_000_060_000,
            "w",
            &mut Turn::default(),
        )
        .expect("claim");
        assert_eq!(claimed.len(), n - 1);
        c.execute(
            "UPDATE jobs SET attempt = 2 WHERE id = ?1",
            params![ids[n - 2]],
        )
        .expect("rescued");
        (c, ids)
    }

    /// An end for each job, cycling through every kind of end, half with progress.
    fn ends(ids: &[String]) -> Vec<AttemptEnd<'_>> {
        ids.iter()
            .enumerate()
            .map(|(i, id)| AttemptEnd {
                id,
                attempt: 1,
                started_at: 1_800_000_000_100 + i as i64,
                how: match i % 5 {
                    0 => Finish::Succeeded {
                        result: "{\"n\":1}",
                    },
                    1 => Finish::Retry {
                        error: "boom",
                        run_at: 1_900_000_000_000,
                        outcome: "timeout",
                    },
                    2 => Finish::Dead {
                        error: "gone",
                        outcome: "dead",
                    },
                    3 => Finish::Canceled {
                        error: Some("canceled"),
                    },
                    _ => Finish::Canceled { error: None },
                },
                progress: (i % 2 == 1).then_some((40 + (i % 50) as u8, "half way")),
            })
            .collect()
    }

    /// Every row of the tables an attempt's end writes.
    fn dump(c: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        for sql in [
            "SELECT * FROM jobs ORDER BY id",
            "SELECT * FROM job_attempts ORDER BY job_id, attempt",
            "SELECT * FROM job_active",
        ] {
            let mut stmt = c.prepare(sql).expect("prepare");
            let n = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    (0..n)
                        .map(|i| {
                            r.get::<_, rusqlite::types::Value>(i)
                                .map(|v| format!("{v:?}"))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .expect("query");
            for row in rows {
                out.push(row.expect("row").join("|"));
            }
        }
        out
    }

    #[test]
    fn finishing_many_at_once_writes_what_finishing_each_writes() {
        let now = 1_800_000_005_000;
        // One short chunk, one exact chunk, and several chunks with a short last one.
        for n in [7, FINISH_CHUNK, 3 * FINISH_CHUNK + 5] {
            let (one_by_one, ids) = db_with_running_jobs(n);
            let each: Vec<bool> = ends(&ids)
                .iter()
                .map(|e| {
                    finish(
                        &one_by_one,
                        e.id,
                        e.attempt,
                        e.started_at,
                        &e.how,
                        e.progress,
                        now,
                    )
                    .expect("finish")
                })
                .collect();
            let (at_once, _) = db_with_running_jobs(n);
            let many = finish_many(&at_once, &ends(&ids), now).expect("finish_many");
            assert_eq!(many, each);
            assert_eq!(
                many.iter().filter(|ok| !**ok).count(),
                2,
                "the rescued and the queued"
            );
            assert_eq!(dump(&at_once), dump(&one_by_one));
        }
        let (update, insert) = finish_many_sql();
        let c = db_with_user();
        let p = plan(&c, &update);
        assert!(
            p.contains("SEARCH jobs USING INDEX sqlite_autoindex_jobs_1 (id=?)"),
            "{p}"
        );
        assert!(!p.contains("SCAN jobs"), "{p}");
        plan(&c, &insert);
    }

    /// SQLite builds a temporary b-tree for a constant `IN` list of three or more values,
    /// every time a statement evaluates it. Migration 0006 removed those from the jobs
    /// table's CHECK, indexes and triggers, which every insert, claim and finish runs.
    #[test]
    fn job_state_changes_build_no_temporary_b_trees() {
        let c = db_with_user();
        let ephemeral = |sql: &str| -> usize {
            c.prepare(&format!("EXPLAIN {sql}"))
                .and_then(|mut s| {
                    s.query_map([], |r| r.get::<_, String>(1))?
                        .collect::<Result<Vec<_>, _>>()
                })
                .expect("explain")
                .iter()
                .filter(|op| op.as_str() == "OpenEphemeral")
                .count()
        };
        let insert = "INSERT INTO jobs (id, user_id, kind, queue, status, priority, payload,
                max_attempts, budget, run_at, created_at, updated_at)
             VALUES ('j', 'u1', 'demo', 'fast', 'queued', 0, '{}', 1, 1, 0, 0, 0)";
        assert_eq!(ephemeral(insert), 0);
        let finish = "UPDATE jobs SET status = 'succeeded', finished_at = 1, lease_until = NULL
             WHERE id = 'j' AND attempt = 1 AND status = 'running'";
        assert_eq!(ephemeral(finish), 0);
        // Triggers are compiled apart from the statement; check their text instead.
        let sqls: Vec<String> = c
            .prepare("SELECT sql FROM sqlite_schema WHERE tbl_name = 'jobs' AND sql IS NOT NULL")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .expect("schema");
        for sql in &sqls {
            for list in sql.split(" IN (").skip(1) {
                let items = list.split(')').next().unwrap_or("").matches(',').count() + 1;
                assert!(items <= 2, "IN list of {items} values in: {sql}");
            }
        }
    }

    #[test]
    fn the_jobs_rebuild_keeps_every_job_and_its_attempt_history() {
        let mut c = db_before("0006_jobs_hot_path");
        for (i, status) in JobStatus::ALL.iter().enumerate() {
            let t = 1_700_000_000_000 + i as i64;
            job_at(&c, t);
            c.execute(
                "UPDATE jobs SET status = ?1, attempt = 1, error = 'e', progress_msg = 'm',
                        finished_at = CASE WHEN ?1 IN ('succeeded', 'dead', 'canceled')
                                           THEN ?2 END
                 WHERE created_at = ?2",
                params![status, t],
            )
            .expect("status");
            c.execute(
                "INSERT INTO job_attempts (job_id, attempt, started_at, finished_at, outcome)
                 SELECT id, 1, ?1, ?1, 'retry' FROM jobs WHERE created_at = ?1",
                [t],
            )
            .expect("attempt");
        }
        let dump = |c: &Connection| -> Vec<String> {
            c.prepare(&format!("SELECT {JOB_COLS} FROM jobs ORDER BY id"))
                .and_then(|mut s| {
                    s.query_map([], |r| Ok(format!("{:?}", job_from_row(r)?)))?
                        .collect()
                })
                .expect("dump")
        };
        let jobs_before = dump(&c);
        crate::storage::migrate::apply(&mut c).expect("upgrade");
        assert_eq!(dump(&c), jobs_before, "every job, every column");
        let attempts: i64 = c
            .query_row("SELECT COUNT(*) FROM job_attempts", [], |r| r.get(0))
            .expect("attempts");
        assert_eq!(attempts, 6, "dropping the old table did not cascade");
        let fk: bool = c
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .expect("fk");
        assert!(fk, "foreign keys are back on");
        assert_eq!(count_active(&c, "u1").expect("active"), 3);
        // The new triggers keep the counter, and job_attempts still cascades.
        let running: String = c
            .query_row("SELECT id FROM jobs WHERE status = 'running'", [], |r| {
                r.get(0)
            })
            .expect("running");
        c.execute("DELETE FROM jobs WHERE id = ?1", [&running])
            .expect("delete");
        assert_eq!(count_active(&c, "u1").expect("active"), 2);
        let left: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM job_attempts WHERE job_id = ?1",
                [&running],
                |r| r.get(0),
            )
            .expect("left");
        assert_eq!(left, 0);
    }
    #[test]
    fn next_run_at_is_the_earliest_waiting_job_found_by_seeks() {
        let c = db_with_user();
        assert_eq!(next_run_at(&c, "fast").expect("empty"), None);
        let plain = |c: &Connection, queue: &str| -> Option<Millis> {
            c.query_row(
                "SELECT MIN(run_at) FROM jobs WHERE queue = ?1
                   AND status IN ('queued', 'retrying')",
                [queue],
                |r| r.get(0),
            )
            .expect("plain")
        };
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for i in 0..300_i64 {
            job_at(&c, 1_700_000_000_000 + i);
            let id: String = c
                .query_row("SELECT id FROM jobs ORDER BY rowid DESC LIMIT 1", [], |r| {
                    r.get(0)
                })
                .expect("id");
            let queue = ["fast", "slow"][(next() % 2) as usize];
            let status = JobStatus::ALL[(next() % JobStatus::ALL.len() as u64) as usize];
            let priority = (next() % 7) as i64 - 3;
            let run_at = 1_800_000_000_000 + (next() % 1_000_000) as i64;
            c.execute(
                "UPDATE jobs SET queue = ?2, status = ?3, priority = ?4, run_at = ?5
                 WHERE id = ?1",
                params![id, queue, status, priority, run_at],
            )
            .expect("update");
            if i % 25 == 0 {
                for q in ["fast", "slow", "none"] {
                    assert_eq!(
                        next_run_at(&c, q).expect("next"),
                        plain(&c, q),
                        "{q} at {i}"
                    );
                }
            }
        }
        // Seeks on (queue, owner, priority), never a walk of the queue's whole backlog.
        let plan = [plan(&c, NEXT_PRIORITY), plan(&c, FIRST_AT_PRIORITY)].join(" | ");
        assert!(
            plan.contains("jobs_claim (queue=? AND user_id=? AND priority=?)"),
            "{plan}"
        );
        assert!(
            plan.contains("jobs_claim (queue=? AND user_id=? AND priority<?)"),
            "{plan}"
        );
    }
    #[test]
    fn claim_takes_due_jobs_by_priority_then_run_at_past_any_number_scheduled() {
        let c = db_with_user();
        let now = 1_800_000_000_000;
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for i in 0..400_i64 {
            job_at(&c, 1_700_000_000_000 + i);
            // Distinct run_at values, half of them due; some jobs not waiting at all.
            let run_at = now - 500_000 + (next() % 1_000) as i64 * 1_000 + i;
            let status =
                ["queued", "retrying", "queued", "running", "succeeded"][(next() % 5) as usize];
            c.execute(
                "UPDATE jobs SET queue = ?2, status = ?3, priority = ?4, run_at = ?5
                 WHERE created_at = ?1",
                params![
                    1_700_000_000_000 + i,
                    ["fast", "slow"][(next() % 2) as usize],
                    status,
                    (next() % 5) as i64 - 2,
                    run_at
                ],
            )
            .expect("update");
        }
        let reference = |c: &Connection, limit: u32| -> Vec<String> {
            c.prepare(
                "SELECT id FROM jobs WHERE queue = 'fast'
                   AND status IN ('queued', 'retrying') AND run_at <= ?1
                 ORDER BY priority DESC, run_at LIMIT ?2",
            )
            .and_then(|mut s| s.query_map(params![now, limit], |r| r.get(0))?.collect())
            .expect("reference")
        };
        let mut claimed_total = 0;
        for limit in [1_u32, 7, 30, 1000] {
            let want = reference(&c, limit);
            let got = claim(
                &c,
                "fast",
                limit,
                now,
                now + 60_000,
                "w",
                &mut Turn::default(),
            )
            .expect("claim");
            let ids: Vec<String> = got.iter().map(|r| r.id.clone()).collect();
            assert_eq!(ids, want, "limit {limit}");
            assert!(
                got.iter()
                    .all(|r| r.status == JobStatus::Running && r.run_at <= now)
            );
            claimed_total += got.len();
        }
        assert!(claimed_total > 0);
        assert!(
            claim(&c, "fast", 10, now, now + 60_000, "w", &mut Turn::default())
                .expect("claim")
                .is_empty()
        );
        // What is left waiting in "fast" is all scheduled for later.
        let waiting_due: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM jobs WHERE queue = 'fast'
                   AND status IN ('queued', 'retrying') AND run_at <= ?1",
                [now],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(waiting_due, 0);
    }

    #[test]
    fn claims_take_owners_in_turn_so_no_backlog_or_priority_starves_another() {
        let c = db_with_user();
        for u in ["u2", "u3"] {
            c.execute(
                "INSERT INTO users (id, email, email_verified, role, token_version, disabled,
                                    created_at, updated_at)
                 VALUES (?1, ?1 || '@example.com', 1, 'user', 0, 0, 0, 0)",
                [u],
            )
            .expect("user");
        }
        let now = 1_800_000_000_000;
        let add = |id: &str, user: Option<&str>, priority: i64, run_at: Millis| {
            insert_job(
                &c,
                &NewJob {
                    id,
                    user_id: user,
                    kind: "demo",
                    queue: "fast",
                    priority,
                    payload: "{}",
                    max_attempts: 1,
                    run_at,
                    idempotency_key: None,
                    request_hash: None,
                    now: run_at,
                },
            )
            .expect("job");
        };
        // u1: a backlog of 200 at the top priority, plus jobs scheduled for later.
        for i in 0..200 {
            add(&format!("a{i:03}"), Some("u1"), 1000, now - 10_000 + i);
        }
        for i in 0..50 {
            add(&format!("s{i:03}"), Some("u1"), 1000, now + 60_000 + i);
        }
        // u2: one job at the lowest priority, submitted last; u3 two; one internal job.
        add("b0", Some("u2"), -1000, now);
        add("c0", Some("u3"), 0, now);
        add("c1", Some("u3"), 5, now);
        add("m0", None, 10, now);
        let mut turn = Turn::default();
        let mut order = Vec::new();
        for _ in 0..6 {
            let got = claim(&c, "fast", 1, now, now + 60_000, "w", &mut turn).expect("claim");
            order.extend(got.into_iter().map(|r| r.id));
        }
        // One slot at a time: every owner in turn, priority only within an owner.
        assert_eq!(order, ["m0", "a000", "b0", "c1", "a001", "c0"], "{order:?}");
        // A wide claim shares its slots: u1's backlog takes what the others leave.
        add("b1", Some("u2"), 0, now);
        let got = claim(&c, "fast", 10, now, now + 60_000, "w", &mut turn).expect("claim");
        let ids: Vec<&str> = got.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids.len(), 10);
        assert!(ids.contains(&"b1"), "{ids:?}");
        assert_eq!(ids.iter().filter(|i| i.starts_with('a')).count(), 9);
        assert!(
            !ids.iter().any(|i| i.starts_with('s')),
            "not yet due: {ids:?}"
        );
        // Whatever the turn, the plain order within one owner holds.
        let a: Vec<&str> = ids.iter().copied().filter(|i| i.starts_with('a')).collect();
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(a, sorted);
        // Nothing due is left but u1's backlog; nothing at all once drained.
        let mut left = 0;
        loop {
            let got = claim(&c, "fast", 64, now, now + 60_000, "w", &mut turn).expect("claim");
            if got.is_empty() {
                break;
            }
            assert!(got.iter().all(|r| r.id.starts_with('a')));
            left += got.len();
        }
        assert_eq!(left, 200 - 2 - 9);
        assert_eq!(next_run_at(&c, "fast").expect("next"), Some(now + 60_000));
    }
}
