//! Page-frame allocator over the hypervisor's pool, for page tables and other page-sized,
//! page-aligned allocations. Built on `buddy_system_allocator::FrameAllocator` (which counts in
//! frame numbers); this wrapper converts to addresses, zeroes pages and keeps an allocation count
//! so tests and debug output can show that nothing leaks.
//!
//! The hypervisor identity-maps RAM, so a frame's physical address is also its address.

use core::sync::atomic::{AtomicUsize, Ordering};

use buddy_system_allocator::FrameAllocator;
use spin::Mutex;

use super::pgtable::{PAGE_SIZE, TableAlloc};

/// The pool of free page frames.
pub struct FramePool {
    inner: Mutex<FrameAllocator<32>>,
    allocated: AtomicUsize,
}

impl FramePool {
    pub const fn new() -> Self {
        Self {
            inner: Mutex::new(FrameAllocator::new()),
            allocated: AtomicUsize::new(0),
        }
    }

    /// Adds `[start, end)` (page aligned) to the pool.
    pub fn add(&self, start: u64, end: u64) {
        self.inner
            .lock()
            .add_frame((start / PAGE_SIZE) as usize, (end / PAGE_SIZE) as usize);
    }

    /// Allocates `pages` contiguous frames aligned to their size (rounded up to a power of two),
    /// zeroed.
    pub fn alloc_zeroed(&self, pages: usize) -> Option<u64> {
        let frame = self.inner.lock().alloc(pages)?;
        self.allocated.fetch_add(pages, Ordering::Relaxed);
        let pa = frame as u64 * PAGE_SIZE;
        // SAFETY: the frames are free RAM from the pool, identity mapped, and now ours.
        unsafe { core::ptr::write_bytes(pa as *mut u8, 0, pages * PAGE_SIZE as usize) };
        Some(pa)
    }

    /// Returns frames to the pool.
    pub fn free(&self, pa: u64, pages: usize) {
        self.inner.lock().dealloc((pa / PAGE_SIZE) as usize, pages);
        self.allocated.fetch_sub(pages, Ordering::Relaxed);
    }

    /// Frames currently allocated.
    pub fn allocated(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }
}

impl Default for FramePool {
    fn default() -> Self {
        Self::new()
    }
}

/// Stage-2 tables draw pages from the pool (through a lock-free `PagePool` in front of it).
impl crate::mm::stage2::PageAllocator for FramePool {
    fn alloc_page(&self) -> Option<u64> {
        self.alloc_zeroed(1)
    }

    fn alloc_pages(&self, pages: usize) -> Option<u64> {
        self.alloc_zeroed(pages)
    }

    fn free_page(&self, pa: u64) {
        self.free(pa, 1);
    }

    fn free_pages(&self, pa: u64, pages: usize) {
        self.free(pa, pages);
    }

    fn table(&self, pa: u64) -> *const crate::mm::stage2::AtomicU64 {
        pa as *const crate::mm::stage2::AtomicU64
    }
}

impl TableAlloc for &'static FramePool {
    fn alloc_pages(&self, pages: usize) -> Option<u64> {
        self.alloc_zeroed(pages)
    }

    fn table(&self, pa: u64) -> *mut u64 {
        pa as *mut u64
    }
}
