//! A fixed-capacity FIFO that never refuses a push: when full, the oldest item is dropped and
//! counted. Holds readings while the link is down; no allocation, capacity fixed at build time.

use heapless::Deque;

/// A ring of at most `N` items, oldest first.
#[derive(Debug)]
pub struct Ring<T, const N: usize> {
    items: Deque<T, N>,
    dropped: u32,
}

impl<T, const N: usize> Default for Ring<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const N: usize> Ring<T, N> {
    /// An empty ring.
    pub const fn new() -> Self {
        Self {
            items: Deque::new(),
            dropped: 0,
        }
    }

    /// Appends `item`; if the ring was full, drops the oldest item, counts it and returns it.
    pub fn push(&mut self, item: T) -> Option<T> {
        let evicted = if self.items.is_full() {
            self.dropped = self.dropped.saturating_add(1);
            self.items.pop_front()
        } else {
            None
        };
        // Cannot fail: there is room now.
        let _ = self.items.push_back(item);
        evicted
    }

    /// Drops the item at `index` (0 is the oldest) and counts it, keeping the others in order;
    /// returns it, or `None` when there is no such item. Takes time in proportion to the items
    /// held: for a full ring making room for something that matters more than what it drops.
    pub fn evict(&mut self, index: usize) -> Option<T> {
        let len = self.items.len();
        if index >= len {
            return None;
        }
        // Turn the deque once round, leaving the one item out.
        let mut evicted = None;
        for i in 0..len {
            let item = self.items.pop_front()?;
            if i == index {
                evicted = Some(item);
            } else {
                // Cannot fail: one item was taken out for each put back.
                let _ = self.items.push_back(item);
            }
        }
        self.dropped = self.dropped.saturating_add(1);
        evicted
    }

    /// The items, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter()
    }

    /// True when the next [`push`](Self::push) drops an item.
    pub fn is_full(&self) -> bool {
        self.items.is_full()
    }

    /// The oldest item.
    pub fn front(&self) -> Option<&T> {
        self.items.front()
    }

    /// Removes and returns the oldest item.
    pub fn pop_front(&mut self) -> Option<T> {
        self.items.pop_front()
    }

    /// Items held.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Most items held at once.
    pub const fn capacity(&self) -> usize {
        N
    }

    /// Items dropped because the ring was full, since it was made (saturating).
    pub fn dropped(&self) -> u32 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_drops_oldest_first_counting_them() {
        let mut ring: Ring<u32, 3> = Ring::new();
        assert!(ring.is_empty());
        for i in 0..3 {
            assert_eq!(ring.push(i), None);
        }
        assert_eq!(ring.push(3), Some(0));
        assert_eq!(ring.push(4), Some(1));
        assert_eq!((ring.len(), ring.dropped()), (3, 2));
        assert_eq!(ring.front(), Some(&2));
        assert_eq!(ring.pop_front(), Some(2));
        assert_eq!(ring.pop_front(), Some(3));
        ring.push(5);
        assert_eq!(ring.pop_front(), Some(4));
        assert_eq!(ring.pop_front(), Some(5));
        assert_eq!(ring.pop_front(), None);
        assert_eq!(ring.dropped(), 2, "popping is not dropping");
    }

    #[test]
    fn evicting_from_the_middle_keeps_the_others_in_order() {
        let mut ring: Ring<u32, 4> = Ring::new();
        for i in 0..4 {
            ring.push(i);
        }
        assert!(ring.is_full());
        assert_eq!(ring.evict(2), Some(2));
        assert_eq!(ring.evict(3), None, "only three left");
        assert_eq!(ring.dropped(), 1);
        ring.push(4);
        assert_eq!(ring.iter().copied().collect::<Vec<_>>(), [0, 1, 3, 4]);
        assert_eq!(ring.evict(0), Some(0));
        assert_eq!(ring.front(), Some(&1));
    }
}
