//! Opaque, time-ordered identifiers (UUIDv7 as 32 hex chars): sortable, so they double
//! as stable pagination cursors, and unguessable enough not to leak counts.

pub fn new_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_unique_and_ordered() {
        let a = super::new_id();
        let b = super::new_id();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a < b);
    }
}

/// The smallest id that [`new_id`] could have produced at `ms`: UUIDv7 starts with the
/// 48-bit millisecond timestamp, so `id >= id_floor_for_millis(t)` selects ids made at or
/// after `t` using an index on the id.
pub fn id_floor_for_millis(ms: i64) -> String {
    let ms = ms.max(0) as u64 & 0xFFFF_FFFF_FFFF;
    format!("{ms:012x}{}", "0".repeat(20))
}

#[cfg(test)]
mod floor_tests {
    #[test]
    fn floor_orders_with_real_ids() {
        let now = crate::clock::now_millis();
        let id = super::new_id();
        assert!(super::id_floor_for_millis(now - 1) <= id);
        assert!(super::id_floor_for_millis(now + 10_000) > id);
    }
}

/// An id for something created at `ms` by the injected clock, so time-based queries over
/// ids agree with the clock the rules use (tests move it).
pub fn new_id_at(ms: i64) -> String {
    let ms = ms.max(0) as u64;
    let ts =
        uuid::Timestamp::from_unix(uuid::NoContext, ms / 1000, ((ms % 1000) * 1_000_000) as u32);
    uuid::Uuid::new_v7(ts).simple().to_string()
}
