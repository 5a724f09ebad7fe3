//! The page allocator of the stage-2 tests (host and loom).
//!
//! Pages come from one arena and have made-up "physical addresses" `ARENA_BASE + index * 4 KiB`
//! (so they are 4 KiB aligned whatever the host allocator does, and work under loom, whose atomics
//! cannot live in raw zeroed memory). It counts outstanding pages, never hands a page out twice
//! (freed pages stay in quarantine), poisons freed pages and panics when `table()` is asked for a
//! freed page ("walked a freed table") or for one it never handed out.

use std::boxed::Box;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering as Std};

use super::sync::{AtomicU64, Ordering};
use super::table::{PageAllocator, TABLE_ENTRIES};

/// Address of the arena's first page.
pub(crate) const ARENA_BASE: u64 = 0x40_0000_0000;
/// What a freed page is filled with: a valid table descriptor pointing outside the arena, so a
/// walker that reads it also panics in `table()`.
pub(crate) const POISON: u64 = 0xdead_beef_dead_beef;

const UNUSED: u8 = 0;
const ALLOCATED: u8 = 1;
const FREED: u8 = 2;

pub(crate) struct TestAlloc {
    entries: Box<[AtomicU64]>,
    state: Box<[AtomicU8]>,
    next: AtomicUsize,
    outstanding: AtomicUsize,
}

impl TestAlloc {
    /// An arena of `pages` pages.
    pub(crate) fn new(pages: usize) -> Self {
        let len = pages * TABLE_ENTRIES;
        #[cfg(not(loom))]
        // SAFETY: all-zero bytes are a valid `AtomicU64` (zero).
        let entries = unsafe { Box::<[AtomicU64]>::new_zeroed_slice(len).assume_init() };
        #[cfg(loom)]
        let entries = (0..len).map(|_| AtomicU64::new(0)).collect();
        Self {
            entries,
            state: (0..pages).map(|_| AtomicU8::new(UNUSED)).collect(),
            next: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
        }
    }

    /// Pages allocated and not freed.
    pub(crate) fn outstanding(&self) -> usize {
        self.outstanding.load(Std::SeqCst)
    }

    /// Whether `pa` was handed out and freed since.
    pub(crate) fn is_freed(&self, pa: u64) -> bool {
        self.state[self.index(pa)].load(Std::SeqCst) == FREED
    }

    fn index(&self, pa: u64) -> usize {
        let offset = pa.wrapping_sub(ARENA_BASE);
        let index = (offset / 4096) as usize;
        assert!(
            offset.is_multiple_of(4096) && index < self.state.len(),
            "{pa:#x} is not a table page"
        );
        index
    }
}

impl PageAllocator for TestAlloc {
    fn alloc_page(&self) -> Option<u64> {
        self.alloc_pages(1)
    }

    fn alloc_pages(&self, pages: usize) -> Option<u64> {
        let mut next = self.next.load(Std::SeqCst);
        let start = loop {
            let start = next.next_multiple_of(pages);
            if start + pages > self.state.len() {
                return None;
            }
            match self
                .next
                .compare_exchange(next, start + pages, Std::SeqCst, Std::SeqCst)
            {
                Ok(_) => break start,
                Err(actual) => next = actual,
            }
        };
        for state in &self.state[start..start + pages] {
            state.store(ALLOCATED, Std::SeqCst);
        }
        self.outstanding.fetch_add(pages, Std::SeqCst);
        Some(ARENA_BASE + start as u64 * 4096)
    }

    fn free_page(&self, pa: u64) {
        self.free_pages(pa, 1);
    }

    fn free_pages(&self, pa: u64, pages: usize) {
        let first = self.index(pa);
        for index in first..first + pages {
            let was = self.state[index].swap(FREED, Std::SeqCst);
            assert_eq!(was, ALLOCATED, "freeing page {index} that is not allocated");
        }
        for entry in &self.entries[first * TABLE_ENTRIES..(first + pages) * TABLE_ENTRIES] {
            entry.store(POISON, Ordering::Relaxed);
        }
        self.outstanding.fetch_sub(pages, Std::SeqCst);
    }

    fn table(&self, pa: u64) -> *const AtomicU64 {
        let index = self.index(pa);
        match self.state[index].load(Std::SeqCst) {
            ALLOCATED => self.entries[index * TABLE_ENTRIES..].as_ptr(),
            FREED => panic!("walked a freed table {pa:#x}"),
            _ => panic!("walked page {pa:#x}, which was never allocated"),
        }
    }
}
