//! A worker's spare read buffers: a connection takes one when its request's
//! first bytes arrive and gives it back when it goes idle, so idle
//! connections hold none and a busy worker does not allocate one per request.

use std::cell::RefCell;

/// Buffers kept spare per worker: a burst of requests beyond it allocates,
/// and what it leaves is freed rather than kept.
pub const POOL_MAX: usize = 64;

pub struct BufferPool {
    size: usize,
    max: usize,
    free: RefCell<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// Pools buffers of `size` bytes, at most `max` of them spare.
    pub fn new(size: usize, max: usize) -> BufferPool {
        BufferPool {
            size,
            max,
            free: RefCell::new(Vec::new()),
        }
    }

    /// An empty buffer with room for `size` bytes.
    pub fn take(&self) -> Vec<u8> {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.size))
    }

    /// Keeps `buf` for another connection, unless the pool is full or `buf`
    /// grew (a large body) or shrank: those are freed.
    pub fn give(&self, mut buf: Vec<u8>) {
        let mut free = self.free.borrow_mut();
        if free.len() < self.max && (self.size..=2 * self.size).contains(&buf.capacity()) {
            buf.clear();
            free.push(buf);
        }
    }

    /// Frees every spare buffer (after a flood, with memory to give back).
    pub fn trim(&self) {
        let mut free = self.free.borrow_mut();
        free.clear();
        free.shrink_to_fit();
    }

    pub fn spare(&self) -> usize {
        self.free.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_only_buffers_of_the_pooled_size() {
        let p = BufferPool::new(1024, 2);
        let a = p.take();
        assert!(a.capacity() >= 1024 && a.is_empty());
        let mut big = p.take();
        big.reserve(1 << 20);
        p.give(big);
        assert_eq!(p.spare(), 0);
        p.give(Vec::new());
        assert_eq!(p.spare(), 0);
        let mut used = a;
        used.extend_from_slice(b"request bytes");
        p.give(used);
        p.give(Vec::with_capacity(1024));
        p.give(Vec::with_capacity(1024));
        assert_eq!(p.spare(), 2);
        assert!(p.take().is_empty());
        p.trim();
        assert_eq!(p.spare(), 0);
    }
}
