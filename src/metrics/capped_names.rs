//! Label values admitted under a cardinality cap, as `agent_name` and `model` are: the first
//! `cap` distinct names each get a value, later ones none (their caller folds them into
//! `__overflow__`). Lookups share a read lock; a new name takes the write lock once.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

/// Names admitted so far, each with its value.
pub(super) struct CappedNames<V> {
    names: RwLock<HashMap<Box<str>, V>>,
    cap: usize,
}

impl<V: Clone> CappedNames<V> {
    /// Room for `cap` names.
    pub(super) fn new(cap: usize) -> Self {
        CappedNames {
            names: RwLock::new(HashMap::new()),
            cap,
        }
    }

    /// `name`'s value, made by `make` when the name is new and there is room; `None` once
    /// `cap` other names were admitted.
    pub(super) fn get_or_admit(&self, name: &str, make: impl FnOnce() -> V) -> Option<V> {
        // A poisoned lock only means another thread panicked mid-insert; the map is intact.
        if let Some(value) = self.names.read().unwrap_or_else(PoisonError::into_inner).get(name) {
            return Some(value.clone());
        }
        let mut names = self.names.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(value) = names.get(name) {
            return Some(value.clone());
        }
        if names.len() >= self.cap {
            return None;
        }
        let value = make();
        names.insert(name.into(), value.clone());
        Some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::CappedNames;

    #[test]
    fn names_past_the_cap_get_no_value_and_admitted_ones_keep_theirs() {
        let names = CappedNames::new(2);
        assert_eq!(names.get_or_admit("a", || 1), Some(1));
        assert_eq!(names.get_or_admit("b", || 2), Some(2));
        assert_eq!(names.get_or_admit("c", || 3), None);
        assert_eq!(names.get_or_admit("a", || 9), Some(1), "made once");
    }
}
