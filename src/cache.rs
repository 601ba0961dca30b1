//! Read-through caches of database state that commits invalidate.
//!
//! Every hot-path cache (auth state, session liveness, billing state, the `/me` profile,
//! usage counts) has the same shape: a reader misses, loads from SQLite, inserts; a
//! writer commits, then invalidates. A plain cache has a race there: a reader whose read
//! transaction began *before* the commit can insert its stale value *after* the
//! invalidation, and that value then lives until the TTL (for auth state: a revoked
//! token accepted for 30 more seconds). [`Loaded`] closes it with invalidation epochs:
//! the loader takes a ticket before reading and its insert is undone when an
//! invalidation of the same stripe happened in between.

use std::borrow::Borrow;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Invalidation stripes: keys hash onto these, so a flood of invalidations for one key
/// makes loads of only 1/STRIPES of the others skip caching.
const STRIPES: usize = 64;

/// A moka cache whose loads cannot resurrect a value invalidated during the load.
pub struct Loaded<K, V> {
    cache: moka::sync::Cache<K, V>,
    epochs: Box<[AtomicU64; STRIPES]>,
    hasher: std::collections::hash_map::RandomState,
}

/// Taken before a load, handed back with its result to [`Loaded::insert`].
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    stripe: usize,
    epoch: u64,
}

impl<K, V> Loaded<K, V>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// `ttl` bounds how long a change made by another process (the CLI on the same
    /// database) takes to show; changes made in this process show at once.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        Loaded {
            cache: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            epochs: Box::new(std::array::from_fn(|_| AtomicU64::new(0))),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    fn stripe<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        (self.hasher.hash_one(key) as usize) % STRIPES
    }

    pub fn get<Q>(&self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.cache.get(key)
    }

    /// Take before starting the read whose result will be inserted.
    pub fn ticket<Q>(&self, key: &Q) -> Ticket
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let stripe = self.stripe(key);
        Ticket {
            stripe,
            epoch: self.epochs[stripe].load(Ordering::SeqCst),
        }
    }

    /// Caches a loaded value unless `key`'s stripe was invalidated since `ticket`.
    pub fn insert(&self, key: K, value: V, ticket: Ticket) {
        let epoch = &self.epochs[ticket.stripe];
        if epoch.load(Ordering::SeqCst) != ticket.epoch {
            return;
        }
        debug_assert_eq!(
            self.stripe(&key),
            ticket.stripe,
            "ticket taken for another key"
        );
        // An invalidation may land between the check and the insert; it bumped the epoch
        // before removing, so re-checking after the insert catches it and undoes it.
        self.cache.insert(key.clone(), value);
        if epoch.load(Ordering::SeqCst) != ticket.epoch {
            self.cache.invalidate(&key);
        }
    }

    /// Drops every value, for a change whose keys are unknown (one made by another
    /// process). Loads in flight when this runs are not cached.
    pub fn invalidate_all(&self) {
        for e in self.epochs.iter() {
            e.fetch_add(1, Ordering::SeqCst);
        }
        self.cache.invalidate_all();
    }

    /// Call after the commit that changed `key`'s value.
    pub fn invalidate<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.epochs[self.stripe(key)].fetch_add(1, Ordering::SeqCst);
        self.cache.invalidate(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> Loaded<String, u32> {
        Loaded::new(100, Duration::from_secs(60))
    }

    #[test]
    fn a_load_is_cached_when_nothing_changed_meanwhile() {
        let c = cache();
        let t = c.ticket("a");
        c.insert("a".into(), 1, t);
        assert_eq!(c.get("a"), Some(1));
    }

    #[test]
    fn a_load_that_raced_an_invalidation_is_not_cached() {
        let c = cache();
        let t = c.ticket("a");
        // The writer commits and invalidates while the reader's (older) read runs.
        c.invalidate("a");
        c.insert("a".into(), 1, t);
        assert_eq!(c.get("a"), None);
        // The next load, begun after the commit, is cached.
        let t = c.ticket("a");
        c.insert("a".into(), 2, t);
        assert_eq!(c.get("a"), Some(2));
    }

    #[test]
    fn invalidate_all_drops_every_value_and_loads_in_flight() {
        let c = cache();
        let t = c.ticket("a");
        c.insert("a".into(), 1, t);
        let in_flight = c.ticket("b");
        c.invalidate_all();
        c.insert("b".into(), 2, in_flight);
        assert_eq!(c.get("a"), None);
        assert_eq!(
            c.get("b"),
            None,
            "a load begun before the change is not cached"
        );
    }

    #[test]
    fn invalidate_drops_the_value() {
        let c = cache();
        let t = c.ticket("a");
        c.insert("a".into(), 1, t);
        c.invalidate("a");
        assert_eq!(c.get("a"), None);
    }

    #[test]
    fn concurrent_loads_and_invalidations_never_leave_a_stale_value() {
        // A "database" value; readers load it and insert it while a writer bumps it and
        // invalidates. Once every load in flight at an invalidation has finished, the
        // cache must not hold a value older than the write.
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU32};
        let c = Arc::new(cache());
        let db = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let done: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
        let readers: Vec<_> = (0..3)
            .map(|i| {
                let (c, db, stop, done) = (c.clone(), db.clone(), stop.clone(), done.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        // Read-through, as the app does: load only on a miss, so a stale
                        // value that got in would stay.
                        if c.get("k").is_none() {
                            let t = c.ticket("k");
                            let v = db.load(Ordering::SeqCst);
                            // A slow read: straddles the writer's invalidation.
                            std::thread::sleep(Duration::from_micros(50));
                            c.insert("k".into(), v, t);
                        } else {
                            std::thread::yield_now();
                        }
                        done[i].fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for _ in 0..300 {
            // Two writes in a row: the first invalidation sends readers to load, the
            // second lands while those loads are in flight.
            db.fetch_add(1, Ordering::SeqCst);
            c.invalidate("k");
            std::thread::sleep(Duration::from_micros(20));
            let v = db.fetch_add(1, Ordering::SeqCst) + 1;
            c.invalidate("k");
            // Wait until each reader finished two more loads: the one in flight at the
            // invalidation, and one begun after it.
            let marks: Vec<u64> = done.iter().map(|d| d.load(Ordering::SeqCst)).collect();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while done
                .iter()
                .zip(&marks)
                .any(|(d, m)| d.load(Ordering::SeqCst) < m + 2)
            {
                assert!(std::time::Instant::now() < deadline, "readers stalled");
                std::thread::yield_now();
            }
            if let Some(cached) = c.get("k") {
                assert!(cached >= v, "stale value {cached} cached after writing {v}");
            }
        }
        stop.store(true, Ordering::SeqCst);
        for r in readers {
            r.join().expect("reader");
        }
    }
}
