//! Keeps every open SSE stream tied to the credential that opened it.
//!
//! A stream registers its [`Grant`] (session, token version, access-token expiry) and gets
//! a [`Guard`] whose token ends the stream. One watcher task closes streams:
//! - at once when the auth service announces a change ([`AuthChange`]: logout, logout-all,
//!   password change, disable, role change), re-checked through the revocation caches
//!   (an admin's stream also ends when the role is gone);
//! - every [`RECHECK`] as a backstop, reading the users and sessions of all open streams
//!   from the database in one batch (a change made by another process, such as the
//!   `warpbase user disable` CLI, is in no cache), and at the access token's expiry.
//!
//! It must not touch the database per event or per stream: the hot path of a stream only
//! checks an atomic, and the backstop costs one read per distinct user and session per
//! round, whatever the number of streams.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthChange, AuthError};
use crate::identity::Grant;
use crate::state::AppState;
use crate::storage::users;

/// How often open streams are re-checked against the database and the clock.
pub const RECHECK: Duration = Duration::from_secs(1);

/// Why a guard ended its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The access token expired: the client should reconnect with a fresh ticket.
    Expired,
    /// The session was revoked, the token version changed or the user was disabled.
    Revoked,
}

struct End {
    token: CancellationToken,
    reason: OnceLock<EndReason>,
}

impl End {
    fn close(&self, reason: EndReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }
}

struct Entry {
    grant: Grant,
    end: Arc<End>,
}

/// The open streams. Cheap to clone.
#[derive(Clone, Default)]
pub struct StreamGuards {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

/// One stream's registration; dropping it (the stream ended) unregisters.
pub struct Guard {
    id: u64,
    end: Arc<End>,
    guards: StreamGuards,
}

impl Guard {
    /// Cancelled when the stream must end: its credential ended, or the server stops.
    pub fn token(&self) -> CancellationToken {
        self.end.token.clone()
    }

    /// Why the guard ended the stream (None while it may go on, or on server shutdown).
    pub fn reason(&self) -> Option<EndReason> {
        self.end.reason.get().copied()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(mut open) = self.guards.inner.open.lock() {
            open.remove(&self.id);
        }
    }
}

impl StreamGuards {
    /// Registers a stream opened with `grant`; its token is a child of `shutdown`.
    pub fn register(&self, grant: Grant, shutdown: &CancellationToken) -> Guard {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let end = Arc::new(End {
            token: shutdown.child_token(),
            reason: OnceLock::new(),
        });
        if let Ok(mut open) = self.inner.open.lock() {
            open.insert(
                id,
                Entry {
                    grant,
                    end: end.clone(),
                },
            );
        } else {
            // A poisoned registry cannot watch the stream: fail safe.
            end.close(EndReason::Revoked);
        }
        Guard {
            id,
            end,
            guards: self.clone(),
        }
    }

    /// How many streams are open.
    pub fn len(&self) -> usize {
        self.inner.open.lock().map(|o| o.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The grants of the open streams that `pick` selects, with their ends.
    fn select(&self, pick: impl Fn(&Grant) -> bool) -> Vec<(Grant, Arc<End>)> {
        self.inner
            .open
            .lock()
            .map(|open| {
                open.values()
                    .filter(|e| pick(&e.grant) && e.end.reason.get().is_none())
                    .map(|e| (e.grant.clone(), e.end.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ends the streams whose token expired at `now_secs`.
    fn expire(&self, now_secs: i64) {
        for (_, end) in self.select(|g| g.expires_at <= now_secs) {
            end.close(EndReason::Expired);
        }
    }
}

/// Starts the watcher task (owned by `state.tasks`, stops with the server).
pub fn start(state: &AppState) {
    let st = state.clone();
    state.tasks.spawn(async move { watch(st).await });
}

async fn watch(state: AppState) {
    let guards = state.events.streams().clone();
    let mut changes = state.auth.subscribe_changes();
    let mut tick = tokio::time::interval(RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut listening = true;
    loop {
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            change = changes.recv(), if listening => match change {
                Ok(AuthChange::User(uid)) => {
                    recheck_cached(&state, &guards, |g| g.principal.user_id == uid).await;
                }
                Ok(AuthChange::Sessions(ids)) => {
                    recheck_cached(&state, &guards, |g| ids.contains(&g.principal.session_id))
                        .await;
                }
                Err(RecvError::Lagged(_)) => recheck_cached(&state, &guards, |_| true).await,
                Err(RecvError::Closed) => listening = false,
            },
            _ = tick.tick() => {
                guards.expire(state.now_millis() / 1000);
                recheck_db(&state, &guards).await;
            }
        }
    }
}

/// Re-checks the selected streams the way a bearer token is checked (through the caches,
/// which the change just invalidated).
async fn recheck_cached(state: &AppState, guards: &StreamGuards, pick: impl Fn(&Grant) -> bool) {
    for (grant, end) in guards.select(pick) {
        match state.auth.revalidate(&grant).await {
            // An admin who lost the role loses what the stream showed as admin.
            Ok(now) if grant.principal.is_admin && !now.is_admin => end.close(EndReason::Revoked),
            Ok(_) => {}
            Err(AuthError::TokenExpired) => end.close(EndReason::Expired),
            // The database could not answer: the next backstop round tries again.
            Err(AuthError::Storage(_)) => {}
            Err(_) => end.close(EndReason::Revoked),
        }
    }
}

/// Re-checks every open stream against the database itself, bypassing the caches, in one
/// read: one lookup per distinct user and session.
async fn recheck_db(state: &AppState, guards: &StreamGuards) {
    let open = guards.select(|_| true);
    if open.is_empty() {
        return;
    }
    let user_ids: HashSet<String> = open
        .iter()
        .map(|(g, _)| g.principal.user_id.clone())
        .collect();
    let session_ids: HashSet<String> = open
        .iter()
        .map(|(g, _)| g.principal.session_id.clone())
        .collect();
    let read = state
        .storage
        .read(move |c| {
            let mut u = HashMap::with_capacity(user_ids.len());
            for id in user_ids {
                let s = users::user_auth_state(c, &id)?;
                u.insert(id, s);
            }
            let mut s = HashMap::with_capacity(session_ids.len());
            for id in session_ids {
                let live = users::session_live(c, &id)?;
                s.insert(id, live);
            }
            Ok::<_, crate::storage::StorageError>((u, s))
        })
        .await;
    let Ok((user_states, sessions)) = read else {
        // Unreadable now: the next round tries again (the caches still apply to requests).
        return;
    };
    let mut stale_users = HashSet::new();
    let mut stale_sessions = HashSet::new();
    for (g, end) in open {
        let p = &g.principal;
        let user_ok = matches!(
            user_states.get(&p.user_id),
            Some(Some(s)) if !s.disabled
                && s.token_version == g.token_version
                && (s.is_admin || !p.is_admin)
        );
        let session_ok = matches!(
            sessions.get(&p.session_id),
            Some(Some((owner, true))) if *owner == p.user_id
        );
        if !(user_ok && session_ok) {
            end.close(EndReason::Revoked);
            stale_users.insert(p.user_id.clone());
            stale_sessions.insert(p.session_id.clone());
        }
    }
    // The change came from elsewhere (another process on the same database): make the
    // request path see it now too, not only when its cache entries expire.
    for uid in stale_users {
        state.auth.invalidate_user(&uid).await;
    }
    if !stale_sessions.is_empty() {
        let ids: Vec<String> = stale_sessions.into_iter().collect();
        state.auth.invalidate_sessions(&ids).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Principal;

    fn grant(user: &str, session: &str, expires_at: i64) -> Grant {
        Grant {
            principal: Principal {
                user_id: user.into(),
                session_id: session.into(),
                is_admin: false,
            },
            token_version: 0,
            expires_at,
        }
    }

    #[test]
    fn guards_expire_at_the_token_expiry_and_unregister_on_drop() {
        let guards = StreamGuards::default();
        let shutdown = CancellationToken::new();
        let a = guards.register(grant("u", "s1", 100), &shutdown);
        let b = guards.register(grant("u", "s2", 200), &shutdown);
        assert_eq!(guards.len(), 2);
        guards.expire(99);
        assert_eq!(a.reason(), None);
        guards.expire(100);
        assert_eq!(a.reason(), Some(EndReason::Expired));
        assert!(a.token().is_cancelled());
        assert!(!b.token().is_cancelled());
        drop(a);
        assert_eq!(guards.len(), 1);
        // Server shutdown ends the stream without a reason.
        shutdown.cancel();
        assert!(b.token().is_cancelled());
        assert_eq!(b.reason(), None);
        drop(b);
        assert!(guards.is_empty());
    }
}
