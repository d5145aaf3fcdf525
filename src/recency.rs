//! Least-recently-seen order over MNs, for per-MN state that must stay bounded.
//!
//! The alarm engine and the downlink state keep something per device. For
//! devices the operator registered that is bounded by the configuration; for
//! MNs nobody registered it is bounded by nothing but what a sender invents,
//! one frame per MN being enough. Both keep their unregistered MNs in a
//! [`Recency`] and, past their cap, drop the one heard from longest ago: a
//! flood of invented MNs then churns through the cap instead of growing it,
//! and a real unregistered device that keeps sending stays near the front.
//!
//! Every operation is O(log n) in the MNs tracked, so a flood at the cap costs
//! the same per frame as traffic below it.

use std::collections::{BTreeMap, HashMap};

/// MNs in the order they were last touched.
#[derive(Debug, Default)]
pub struct Recency {
    clock: u64,
    stamps: HashMap<String, u64>,
    order: BTreeMap<u64, String>,
}

impl Recency {
    /// Marks `mn` as just seen; true when it was not tracked before.
    pub fn touch(&mut self, mn: &str) -> bool {
        self.clock += 1;
        let now = self.clock;
        match self.stamps.get_mut(mn) {
            Some(stamp) => {
                // Moves the key out of its old slot: no string is copied for an MN
                // already tracked.
                let key = self.order.remove(stamp).unwrap_or_else(|| mn.to_owned());
                *stamp = now;
                self.order.insert(now, key);
                false
            }
            None => {
                self.stamps.insert(mn.to_owned(), now);
                self.order.insert(now, mn.to_owned());
                true
            }
        }
    }

    /// Stops tracking `mn` (it became registered); true when it was tracked.
    pub fn remove(&mut self, mn: &str) -> bool {
        match self.stamps.remove(mn) {
            Some(stamp) => {
                self.order.remove(&stamp);
                true
            }
            None => false,
        }
    }

    /// Removes and returns the MN touched longest ago.
    pub fn pop_oldest(&mut self) -> Option<String> {
        let (_, mn) = self.order.pop_first()?;
        self.stamps.remove(&mn);
        Some(mn)
    }

    /// MNs tracked.
    pub fn len(&self) -> usize {
        self.stamps.len()
    }

    /// True when no MN is tracked.
    pub fn is_empty(&self) -> bool {
        self.stamps.is_empty()
    }

    /// Whether `mn` is tracked.
    pub fn contains(&self, mn: &str) -> bool {
        self.stamps.contains_key(mn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_first_and_touch_moves_to_the_back() {
        let mut r = Recency::default();
        assert!(r.touch("a"));
        assert!(r.touch("b"));
        assert!(r.touch("c"));
        assert!(!r.touch("a"), "already tracked");
        assert_eq!(r.len(), 3);
        assert_eq!(r.pop_oldest().as_deref(), Some("b"));
        assert!(r.remove("c"));
        assert!(!r.remove("c"));
        assert_eq!(r.pop_oldest().as_deref(), Some("a"));
        assert_eq!(r.pop_oldest(), None);
        assert!(r.is_empty());
    }
}
