//! The ids of recently received messages, to drop the repeats NATS sends
//! when several of a node's subscriptions match one message. Repeats arrive
//! within moments of each other, so a bounded window is enough.

use std::collections::{HashSet, VecDeque};

pub struct Recent {
    seen: HashSet<(u64, u64)>,
    order: VecDeque<(u64, u64)>,
    capacity: usize,
}

impl Recent {
    pub fn new(capacity: usize) -> Recent {
        Recent {
            seen: HashSet::with_capacity(capacity),
            order: VecDeque::with_capacity(capacity),
            capacity: capacity.max(1),
        }
    }

    /// Record `(origin, seq)`; false if it is already in the window.
    pub fn first_time(&mut self, origin: u64, seq: u64) -> bool {
        if !self.seen.insert((origin, seq)) {
            return false;
        }
        if self.order.len() == self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.order.push_back((origin, seq));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_within_the_window_are_dropped() {
        let mut r = Recent::new(3);
        assert!(r.first_time(1, 1));
        assert!(!r.first_time(1, 1));
        assert!(r.first_time(2, 1));
        assert!(r.first_time(1, 2));
        assert!(r.first_time(1, 3));
        // (1, 1) left the window.
        assert!(r.first_time(1, 1));
        assert!(!r.first_time(1, 3));
    }
}
