//! A lock-free pool of free table pages in front of a slower [`PageAllocator`].
//!
//! Stage-2 map and unmap must not take a lock, but the frame allocator behind them has one. The
//! pool keeps free 4 KiB pages on a Treiber stack: the link to the next free page is stored in the
//! free page itself (its first entry), and the head is one `u64` holding the top page's address
//! (48 bits) and a 16-bit counter that changes on every push and pop, so a compare-and-swap cannot
//! succeed on a head that was popped and pushed back in between (ABA). When the pool is empty it
//! takes a batch of pages from the backing allocator — the only time that lock is taken. Pages
//! come out zeroed.
//!
//! Pages go back to the backing allocator only on [`PagePool::trim`] and on drop, which have the
//! pool to themselves: a CPU in the middle of a pop may read the link of a page that another CPU
//! just popped (its value is then discarded by the failing compare-and-swap), so a page may not
//! leave the pool's memory while pops can run. Multi-page blocks (concatenated roots) are passed
//! through to the backing allocator.
//!
//! The 16-bit counter makes ABA need 65536 pool operations by other CPUs between one CPU's load of
//! the head and its compare-and-swap; such a stall is not credible at EL2 with interrupts masked.

use super::sync::{AtomicU64, Ordering};
use super::table::{PageAllocator, TABLE_ENTRIES};

const ADDR_MASK: u64 = (1 << 48) - 1;
const TAG_SHIFT: u32 = 48;

/// A lock-free page pool; see the module docs.
pub struct PagePool<A: PageAllocator> {
    backing: A,
    /// Tag (16 bits) << 48 | address of the top free page (0: empty).
    head: AtomicU64,
    /// Pages in the pool (approximate while operations run).
    pooled: AtomicU64,
    batch: usize,
}

fn next_head(head: u64, pa: u64) -> u64 {
    let tag = (head >> TAG_SHIFT).wrapping_add(1) & 0xffff;
    (tag << TAG_SHIFT) | pa
}

impl<A: PageAllocator> PagePool<A> {
    /// An empty pool that refills `batch` (at least 1) pages at a time from `backing`.
    pub fn new(backing: A, batch: usize) -> Self {
        Self {
            backing,
            head: AtomicU64::new(0),
            pooled: AtomicU64::new(0),
            batch: batch.max(1),
        }
    }

    /// The allocator the pool refills from.
    pub fn backing(&self) -> &A {
        &self.backing
    }

    /// Pages in the pool now.
    pub fn pooled(&self) -> usize {
        self.pooled.load(Ordering::Relaxed) as usize
    }

    /// Takes up to `pages` pages from the backing allocator into the pool (e.g. before a VM
    /// starts); returns how many it got.
    pub fn fill(&self, pages: usize) -> usize {
        for got in 0..pages {
            match self.backing.alloc_page() {
                Some(pa) => self.push(pa),
                None => return got,
            }
        }
        pages
    }

    /// Returns pooled pages to the backing allocator until at most `keep` are left.
    pub fn trim(&mut self, keep: usize) {
        while self.pooled() > keep {
            match self.pop() {
                Some(pa) => self.backing.free_page(pa),
                None => break,
            }
        }
    }

    /// The free page's link word: its first entry.
    fn link(&self, pa: u64) -> &AtomicU64 {
        // SAFETY: `pa` is a page this pool owns (pushed and not popped since, or popped by a CPU
        // whose failing compare-and-swap discards what it read); pool pages stay allocated in the
        // backing allocator while the pool is shared, and `table()` points at its entries.
        unsafe { &*self.backing.table(pa) }
    }

    fn push(&self, pa: u64) {
        debug_assert!(
            pa != 0 && pa & 0xfff == 0 && pa & !ADDR_MASK == 0,
            "bad page {pa:#x}"
        );
        let link = self.link(pa);
        let mut head = self.head.load(Ordering::Relaxed);
        loop {
            link.store(head & ADDR_MASK, Ordering::Relaxed);
            // Release: the link and everything the freeing CPU did to the page happen before a
            // pop that takes it.
            match self.head.compare_exchange_weak(
                head,
                next_head(head, pa),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => head = actual,
            }
        }
        self.pooled.fetch_add(1, Ordering::Relaxed);
    }

    fn pop(&self) -> Option<u64> {
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            let pa = head & ADDR_MASK;
            if pa == 0 {
                return None;
            }
            // May be stale if another CPU popped `pa` meanwhile; then the head's tag changed and
            // the compare-and-swap below fails.
            let next = self.link(pa).load(Ordering::Relaxed) & ADDR_MASK;
            match self.head.compare_exchange_weak(
                head,
                next_head(head, next),
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.pooled.fetch_sub(1, Ordering::Relaxed);
                    return Some(pa);
                }
                Err(actual) => head = actual,
            }
        }
    }

    fn zero(&self, pa: u64) {
        let entries = self.backing.table(pa);
        for i in 0..TABLE_ENTRIES {
            // SAFETY: the page is ours (just popped); `table()` points at its entries. Atomic
            // stores, because a CPU in a stale pop may still read the link word.
            unsafe { &*entries.add(i) }.store(0, Ordering::Relaxed);
        }
    }
}

impl<A: PageAllocator> PageAllocator for PagePool<A> {
    fn alloc_page(&self) -> Option<u64> {
        if let Some(pa) = self.pop() {
            self.zero(pa);
            return Some(pa);
        }
        // Empty: one trip to the backing allocator for a batch; keep the first page.
        let first = self.backing.alloc_page()?;
        for _ in 1..self.batch {
            match self.backing.alloc_page() {
                Some(pa) => self.push(pa),
                None => break,
            }
        }
        Some(first)
    }

    fn alloc_pages(&self, pages: usize) -> Option<u64> {
        if pages == 1 {
            self.alloc_page()
        } else {
            self.backing.alloc_pages(pages)
        }
    }

    fn free_page(&self, pa: u64) {
        self.push(pa);
    }

    fn free_pages(&self, pa: u64, pages: usize) {
        if pages == 1 {
            self.push(pa);
        } else {
            self.backing.free_pages(pa, pages);
        }
    }

    fn table(&self, pa: u64) -> *const AtomicU64 {
        self.backing.table(pa)
    }
}

impl<A: PageAllocator> Drop for PagePool<A> {
    fn drop(&mut self) {
        self.trim(0);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::mm::stage2::tests_alloc::TestAlloc;
    use std::{sync::Arc, thread, vec::Vec};

    #[test]
    fn pool_refills_in_batches_recycles_and_zeroes() {
        let backing = TestAlloc::new(64);
        let pool = PagePool::new(&backing, 8);
        let a = pool.alloc_page().unwrap();
        assert_eq!(backing.outstanding(), 8, "one batch taken");
        assert_eq!(pool.pooled(), 7);
        // SAFETY: `a` is a live page from the pool.
        unsafe { &*pool.table(a).add(5) }.store(0x1234, Ordering::Relaxed);
        pool.free_page(a);
        assert_eq!(pool.pooled(), 8);
        let b = pool.alloc_page().unwrap();
        assert_eq!(b, a, "last freed comes back first");
        for i in 0..TABLE_ENTRIES {
            // SAFETY: `b` is a live page from the pool.
            assert_eq!(unsafe { &*pool.table(b).add(i) }.load(Ordering::Relaxed), 0);
        }
        let root = pool.alloc_pages(2).unwrap();
        assert_eq!(root % (2 * 4096), 0);
        pool.free_pages(root, 2);
        pool.free_page(b);
        drop(pool);
        assert_eq!(backing.outstanding(), 0, "drop returns every page");
    }

    #[test]
    fn pool_reports_exhaustion_and_trims() {
        let backing = TestAlloc::new(4);
        let mut pool = PagePool::new(&backing, 3);
        let pages: Vec<u64> = (0..4).map(|_| pool.alloc_page().unwrap()).collect();
        assert_eq!(pool.alloc_page(), None);
        for &pa in &pages {
            pool.free_page(pa);
        }
        pool.trim(1);
        assert_eq!(pool.pooled(), 1);
        assert_eq!(backing.outstanding(), 1);
        assert_eq!(
            pool.fill(10),
            0,
            "the backing allocator is out of fresh pages"
        );
    }

    #[test]
    fn pool_threads_never_share_a_page() {
        const THREADS: u64 = 4;
        let backing = Arc::new(TestAlloc::new(4096));
        let pool = Arc::new(PagePool::new(backing.clone(), 16));
        thread::scope(|s| {
            for t in 0..THREADS {
                let pool = &pool;
                s.spawn(move || {
                    let mut held = Vec::new();
                    for round in 0..2000u64 {
                        let pa = pool.alloc_page().expect("pool empty");
                        let page = pool.table(pa);
                        let stamp = (t << 32) | round;
                        for i in 0..TABLE_ENTRIES {
                            // SAFETY: `pa` is ours until we free it.
                            let e = unsafe { &*page.add(i) };
                            assert_eq!(e.load(Ordering::Relaxed), 0, "page not zeroed");
                            e.store(stamp, Ordering::Relaxed);
                        }
                        held.push((pa, stamp));
                        if round % 3 != 0 {
                            let (pa, stamp) = held.swap_remove((round as usize * 7) % held.len());
                            let page = pool.table(pa);
                            for i in 0..TABLE_ENTRIES {
                                // SAFETY: as above.
                                let v = unsafe { &*page.add(i) }.load(Ordering::Relaxed);
                                assert_eq!(v, stamp, "page handed out twice");
                            }
                            pool.free_page(pa);
                        }
                    }
                    for (pa, _) in held {
                        pool.free_page(pa);
                    }
                });
            }
        });
        assert_eq!(backing.outstanding(), pool.pooled());
        drop(pool);
        assert_eq!(backing.outstanding(), 0);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::mm::stage2::tests_alloc::TestAlloc;
    use loom::sync::Arc;
    use std::vec::Vec;

    /// Two CPUs pop and push concurrently, including the ABA pattern (pop A, pop B, push A while
    /// another CPU holds a stale view of A): no page is handed out twice, none is lost.
    #[test]
    fn loom_pool_push_pop() {
        let mut model = loom::model::Builder::new();
        model.preemption_bound = Some(3);
        model.check(|| {
            let backing = std::sync::Arc::new(TestAlloc::new(8));
            let pool = Arc::new(PagePool::new(backing.clone(), 1));
            assert_eq!(pool.fill(3), 3);
            let p2 = pool.clone();
            let t = loom::thread::spawn(move || {
                let a = p2.alloc_page().unwrap();
                p2.free_page(a);
                a
            });
            let x = pool.alloc_page().unwrap();
            let y = pool.alloc_page().unwrap();
            assert_ne!(x, y);
            pool.free_page(x);
            let _ = t.join().unwrap();
            // Everything is back: the pool holds the other two of the three pages.
            assert_eq!(pool.pooled(), 2);
            let mut all: Vec<u64> = (0..2).map(|_| pool.alloc_page().unwrap()).collect();
            assert_eq!(backing.outstanding(), 3, "no refill was needed");
            all.push(y);
            all.sort_unstable();
            all.dedup();
            assert_eq!(all.len(), 3, "a page was lost or handed out twice");
            for pa in all {
                pool.free_page(pa);
            }
            drop(pool);
            assert_eq!(backing.outstanding(), 0);
        });
    }
}
