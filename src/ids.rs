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
