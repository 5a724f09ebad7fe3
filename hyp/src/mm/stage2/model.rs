//! A model of a hardware TLB with walk caches, to test that stage-2 table updates are invalidated
//! correctly (test builds only).
//!
//! [`ModelTlb`] is a [`TlbBackend`] that behaves like an agent walking the VM's stage 2:
//!
//! * [`ModelTlb::access`] translates an IPA. It first looks in its caches, else walks the table
//!   from the root **through the raw descriptors in memory**, with its own walker that knows
//!   only the architectural descriptor format (nothing from `table.rs`), and caches what it used:
//!   (a) the leaf translation (block or page, with its level), (b) every table pointer it
//!   followed (a walk cache: "the level-L table for this IPA region is at PA T").
//! * [`ModelTlb::access_va`] translates through a fake identity stage 1 (VA = IPA) and caches
//!   (c) a *combined* stage-1+2 entry keyed by the VA page, like a CPU or a nested SMMU stream.
//! * `invalidate` only queues; `sync` applies what was queued, with the minimum any correct
//!   hardware guarantees:
//!   - everything (`range: None`): drops (a), (b) and (c);
//!   - a range, leaf only: drops the leaf entries overlapping it — only those at the hinted level
//!     when `level` is non-zero (a TTL hint makes hardware skip other levels) — and the combined
//!     entries of VAs in it (the backends follow S2 range invalidations with a stage-1
//!     invalidation such as `VMALLE1`/`NH_ALL`), but keeps **every** walk-cache entry;
//!   - a range, not leaf only: also drops walk-cache entries whose region overlaps it (the
//!     level hint is not applied to non-leaf invalidations).
//! * After a `sync`, using an entry that disagrees with memory is a bug:
//!   [`ModelTlb::check_coherent`] compares every cached entry with a fresh walk and fails on any
//!   difference, and on any walk (cached or fresh) through a table page the allocator freed.
//!
//! Attributes are compared on the bits that change a translation: MemAttr, S2AP, SH, AF, XN.
//! A cached block whose range memory now maps with smaller entries to the same output and
//! attributes (a block split without break-before-make) is coherent.

use std::collections::HashMap;
use std::format;
use std::string::String;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::vec::Vec;

use crate::mm::stage2::table::PageAllocator;
use crate::mm::stage2::tests_alloc::TestAlloc;
use crate::mm::stage2::tlb::{Invalidation, TlbBackend, TlbError};

const DESC_VALID: u64 = 1 << 0;
const DESC_TABLE_OR_PAGE: u64 = 1 << 1;
const ADDR_MASK: u64 = 0x0000_ffff_ffff_f000;
/// MemAttr[5:2], S2AP[7:6], SH[9:8], AF[10], XN[54:53].
const ATTR_MASK: u64 = 0x7fc | (0b11 << 53);
const PAGE: u64 = 4096;

/// How the model reads the tables and learns which table pages were freed.
pub trait ModelMemory: Send + Sync {
    /// The table page at physical address `pa` (a concatenated root may span several pages).
    fn table(&self, pa: u64) -> *const AtomicU64;
    /// True once the table page at `pa` was given back to the allocator.
    fn is_freed(&self, pa: u64) -> bool;
}

/// Where the walk starts (VTTBR / S2TTB and VTCR).
#[derive(Clone, Copy, Debug)]
pub struct Root {
    pub pa: u64,
    pub start_level: u8,
    pub ipa_bits: u32,
}

fn shift(level: u8) -> u32 {
    12 + 9 * (3 - u32::from(level))
}

fn size(level: u8) -> u64 {
    1 << shift(level)
}

fn overlaps(base: u64, len: u64, start: u64, end: u64) -> bool {
    base < end && start < base + len
}

/// What a walk found.
enum Walked {
    Leaf { level: u8, desc: u64 },
    Fault,
}

#[derive(Default)]
struct State {
    /// (a) (level, IPA base) → leaf descriptor.
    leaves: HashMap<(u8, u64), u64>,
    /// (b) (level of the table, IPA base of the region it covers) → table PA.
    walks: HashMap<(u8, u64), u64>,
    /// (c) VA page → (PA page, attribute bits).
    combined: HashMap<u64, (u64, u64)>,
    /// Invalidations queued since the last sync.
    pending: Vec<Invalidation>,
    /// Walks through freed table pages seen by `access`.
    violations: Vec<String>,
    hits: u64,
    walks_done: u64,
}

/// A TLB with walk caches over one VM's stage-2 table (see the module docs).
pub struct ModelTlb {
    mem: Arc<dyn ModelMemory>,
    root: Root,
    vmid: u16,
    state: Mutex<State>,
}

/// Counters, to check a test really exercised the caches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelStats {
    pub hits: u64,
    pub walks: u64,
    pub leaves: usize,
    pub walk_entries: usize,
    pub combined: usize,
}

impl ModelTlb {
    pub fn new(mem: Arc<dyn ModelMemory>, root: Root, vmid: u16) -> Self {
        Self {
            mem,
            root,
            vmid,
            state: Mutex::new(State::default()),
        }
    }

    fn entries(&self, level: u8) -> u64 {
        if level == self.root.start_level {
            1 << (self.root.ipa_bits - shift(level))
        } else {
            512
        }
    }

    fn read(&self, table: u64, level: u8, ipa: u64) -> u64 {
        let index = (ipa >> shift(level)) & (self.entries(level) - 1);
        // SAFETY: `table` is a table page of this VM's stage 2 (the root, or a page a table
        // descriptor points at); freed pages stay readable in the test allocators (they are
        // quarantined, not unmapped), and `index` is within the table.
        unsafe { (*self.mem.table(table).add(index as usize)).load(Ordering::Acquire) }
    }

    /// Walks from `table` at `level`. `cache`: record walk-cache and leaf entries.
    fn walk_from(
        &self,
        st: &mut State,
        mut table: u64,
        mut level: u8,
        ipa: u64,
        cache: bool,
    ) -> Result<Walked, String> {
        loop {
            if self.mem.is_freed(table) {
                return Err(format!(
                    "walk of IPA {ipa:#x} read level-{level} table page {table:#x}, which was freed"
                ));
            }
            let desc = self.read(table, level, ipa);
            if desc & DESC_VALID == 0 || level == 0 && desc & DESC_TABLE_OR_PAGE == 0 {
                return Ok(Walked::Fault);
            }
            if level < 3 && desc & DESC_TABLE_OR_PAGE != 0 {
                table = desc & ADDR_MASK;
                level += 1;
                if cache {
                    st.walks
                        .insert((level, ipa & !(size(level - 1) - 1)), table);
                }
                continue;
            }
            if level == 3 && desc & DESC_TABLE_OR_PAGE == 0 {
                return Ok(Walked::Fault); // reserved encoding at level 3
            }
            if cache {
                st.leaves.insert((level, ipa & !(size(level) - 1)), desc);
            }
            return Ok(Walked::Leaf { level, desc });
        }
    }

    fn out(level: u8, desc: u64, ipa: u64) -> u64 {
        (desc & ADDR_MASK & !(size(level) - 1)) | (ipa & (size(level) - 1))
    }

    fn lookup(&self, st: &mut State, ipa: u64) -> Option<(u64, u64, u8)> {
        if ipa >> self.root.ipa_bits != 0 {
            return None;
        }
        for level in 1..=3 {
            if let Some(&desc) = st.leaves.get(&(level, ipa & !(size(level) - 1))) {
                st.hits += 1;
                return Some((Self::out(level, desc, ipa), desc & ATTR_MASK, level));
            }
        }
        // Start from the deepest cached table pointer covering the IPA, else from the root.
        let (mut table, mut level) = (self.root.pa, self.root.start_level);
        for l in (self.root.start_level + 1..=3).rev() {
            if let Some(&t) = st.walks.get(&(l, ipa & !(size(l - 1) - 1))) {
                (table, level) = (t, l);
                break;
            }
        }
        st.walks_done += 1;
        match self.walk_from(st, table, level, ipa, true) {
            Ok(Walked::Leaf { level, desc }) => {
                Some((Self::out(level, desc, ipa), desc & ATTR_MASK, level))
            }
            Ok(Walked::Fault) => None,
            Err(e) => {
                st.violations.push(e);
                None
            }
        }
    }

    /// Translates `ipa` like the hardware would: (output address, attribute bits, leaf level).
    pub fn access(&self, ipa: u64) -> Option<(u64, u64, u8)> {
        let mut st = self.state.lock().unwrap();
        self.lookup(&mut st, ipa)
    }

    /// Translates `va` through the identity stage 1 and the stage 2, caching a combined entry
    /// for the VA page: (output address, attribute bits).
    pub fn access_va(&self, va: u64) -> Option<(u64, u64)> {
        let mut st = self.state.lock().unwrap();
        let page = va & !(PAGE - 1);
        if let Some(&(pa, attrs)) = st.combined.get(&page) {
            st.hits += 1;
            return Some((pa | (va & (PAGE - 1)), attrs));
        }
        let (pa, attrs, _) = self.lookup(&mut st, va)?;
        st.combined.insert(page, (pa & !(PAGE - 1), attrs));
        Some((pa, attrs))
    }

    pub fn stats(&self) -> ModelStats {
        let st = self.state.lock().unwrap();
        ModelStats {
            hits: st.hits,
            walks: st.walks_done,
            leaves: st.leaves.len(),
            walk_entries: st.walks.len(),
            combined: st.combined.len(),
        }
    }

    /// A fresh, uncached walk of `ipa`.
    fn fresh(&self, ipa: u64) -> Result<Walked, String> {
        let mut scratch = State::default();
        self.walk_from(
            &mut scratch,
            self.root.pa,
            self.root.start_level,
            ipa,
            false,
        )
    }

    /// Checks every cached entry against a fresh walk of the tables as they are now. Call it
    /// after a sync: any difference is an invalidation that was missing (or too narrow), and
    /// any walk through a freed table page is a use after free.
    pub fn check_coherent(&self) -> Result<(), String> {
        let st = self.state.lock().unwrap();
        if !st.pending.is_empty() {
            return Err(format!(
                "{} invalidation(s) queued but not synced",
                st.pending.len()
            ));
        }
        if let Some(v) = st.violations.first() {
            return Err(v.clone());
        }
        for (&(level, base), &desc) in &st.leaves {
            let end = base + size(level);
            let mut ipa = base;
            while ipa < end {
                let want = (Self::out(level, desc, ipa), desc & ATTR_MASK);
                let step = match self.fresh(ipa)? {
                    Walked::Leaf { level: l, desc: d }
                        if (Self::out(l, d, ipa), d & ATTR_MASK) == want =>
                    {
                        size(l) - (ipa & (size(l) - 1))
                    }
                    Walked::Leaf { level: l, desc: d } => {
                        return Err(format!(
                            "stale level-{level} TLB entry at IPA {base:#x}: cached {:#x} attrs \
                             {:#x} for {ipa:#x}, memory has level {l} -> {:#x} attrs {:#x}",
                            want.0,
                            want.1,
                            Self::out(l, d, ipa),
                            d & ATTR_MASK
                        ));
                    }
                    Walked::Fault => {
                        return Err(format!(
                            "stale level-{level} TLB entry at IPA {base:#x}: {ipa:#x} is cached \
                             as {:#x} but no longer mapped",
                            want.0
                        ));
                    }
                };
                ipa += step.min(end - ipa);
            }
        }
        for (&(level, base), &table) in &st.walks {
            if self.mem.is_freed(table) {
                return Err(format!(
                    "walk cache holds the level-{level} table {table:#x} for IPA {base:#x}, \
                     which was freed"
                ));
            }
            // The entry one level up must still point at `table`.
            let (mut t, mut l) = (self.root.pa, self.root.start_level);
            let now = loop {
                if self.mem.is_freed(t) {
                    return Err(format!(
                        "fresh walk of {base:#x} reached freed table {t:#x}"
                    ));
                }
                let d = self.read(t, l, base);
                if d & DESC_VALID == 0 || d & DESC_TABLE_OR_PAGE == 0 || l == 3 {
                    break None;
                }
                if l + 1 == level {
                    break Some(d & ADDR_MASK);
                }
                (t, l) = (d & ADDR_MASK, l + 1);
            };
            if now != Some(table) {
                return Err(format!(
                    "stale walk-cache entry: level-{level} table for IPA {base:#x} cached at \
                     {table:#x}, memory now has {now:#x?}"
                ));
            }
        }
        for (&va, &(pa, attrs)) in &st.combined {
            match self.fresh(va)? {
                Walked::Leaf { level, desc }
                    if (Self::out(level, desc, va), desc & ATTR_MASK) == (pa, attrs) => {}
                _ => {
                    return Err(format!(
                        "stale combined stage-1+2 entry for VA {va:#x} -> {pa:#x} attrs {attrs:#x}"
                    ));
                }
            }
        }
        Ok(())
    }

    fn apply(st: &mut State, inv: &Invalidation) {
        let Some((start, end)) = inv.range else {
            st.leaves.clear();
            st.walks.clear();
            st.combined.clear();
            return;
        };
        st.leaves.retain(|&(level, base), _| {
            let hinted_away = inv.leaf_only && inv.level != 0 && inv.level != level;
            hinted_away || !overlaps(base, size(level), start, end)
        });
        if !inv.leaf_only {
            st.walks
                .retain(|&(level, base), _| !overlaps(base, size(level - 1), start, end));
        }
        st.combined.retain(|&va, _| !(start <= va && va < end));
    }
}

impl TlbBackend for ModelTlb {
    fn invalidate(&self, inv: &Invalidation) {
        assert_eq!(inv.vmid, self.vmid, "invalidation for another VM");
        self.state.lock().unwrap().pending.push(*inv);
    }

    fn sync(&self, vmid: u16) -> Result<(), TlbError> {
        assert_eq!(vmid, self.vmid);
        let mut st = self.state.lock().unwrap();
        let pending = core::mem::take(&mut st.pending);
        for inv in &pending {
            Self::apply(&mut st, inv);
        }
        Ok(())
    }

    fn name(&self) -> &str {
        "model"
    }
}

/// Table memory for tests: zeroed, naturally aligned host pages whose "physical address" is
/// their host address. Freed pages are quarantined (kept allocated, marked freed) so a walk
/// through one is detectable instead of undefined behaviour; everything is released on drop.
#[derive(Default)]
pub struct TestMem {
    inner: Mutex<TestMemInner>,
}

#[derive(Default)]
struct TestMemInner {
    /// Every block allocated: (address, pages).
    blocks: Vec<(u64, usize)>,
    /// Page address → freed.
    freed: HashMap<u64, bool>,
    /// Freed blocks available for reuse (by page count); reuse makes stale walk caches visible
    /// as wrong translations too.
    reusable: Vec<(u64, usize)>,
    reuse: bool,
}

impl TestMem {
    /// `reuse`: hand freed pages out again (after zeroing) instead of keeping them quarantined.
    pub fn new(reuse: bool) -> Arc<Self> {
        let m = Self::default();
        m.inner.lock().unwrap().reuse = reuse;
        Arc::new(m)
    }

    pub fn alloc(&self, pages: usize) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        if inner.reuse
            && let Some(i) = inner.reusable.iter().position(|&(_, n)| n == pages)
        {
            let (pa, _) = inner.reusable.swap_remove(i);
            for p in 0..pages as u64 {
                inner.freed.insert(pa + p * PAGE, false);
            }
            // SAFETY: the block was allocated by this allocator with `pages` pages and is not
            // in use (it was freed).
            unsafe { core::ptr::write_bytes(pa as *mut u8, 0, pages * PAGE as usize) };
            return pa;
        }
        let bytes = pages * PAGE as usize;
        let layout = std::alloc::Layout::from_size_align(bytes, bytes).unwrap();
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) } as u64;
        assert_ne!(p, 0, "out of host memory");
        inner.blocks.push((p, pages));
        for i in 0..pages as u64 {
            inner.freed.insert(p + i * PAGE, false);
        }
        p
    }

    pub fn free(&self, pa: u64, pages: usize) {
        let mut inner = self.inner.lock().unwrap();
        for i in 0..pages as u64 {
            let f = inner
                .freed
                .get_mut(&(pa + i * PAGE))
                .expect("not allocated here");
            assert!(!*f, "double free of {pa:#x}");
            *f = true;
        }
        if inner.reuse {
            inner.reusable.push((pa, pages));
        }
    }

    /// Pages allocated and not freed.
    pub fn live_pages(&self) -> usize {
        self.inner
            .lock()
            .unwrap()
            .freed
            .values()
            .filter(|f| !**f)
            .count()
    }

    /// Writes entry `index` of the table at `pa`.
    pub fn set(&self, pa: u64, index: usize, desc: u64) {
        // SAFETY: `pa` is a live table page from `alloc` and `index` is within it.
        unsafe { (*(pa as *const AtomicU64).add(index)).store(desc, Ordering::Release) }
    }
}

impl ModelMemory for TestMem {
    fn table(&self, pa: u64) -> *const AtomicU64 {
        pa as *const AtomicU64
    }
    fn is_freed(&self, pa: u64) -> bool {
        self.inner
            .lock()
            .unwrap()
            .freed
            .get(&pa)
            .copied()
            .unwrap_or(false)
    }
}

impl PageAllocator for TestMem {
    fn alloc_page(&self) -> Option<u64> {
        Some(self.alloc(1))
    }
    fn alloc_pages(&self, pages: usize) -> Option<u64> {
        Some(self.alloc(pages))
    }
    fn free_page(&self, pa: u64) {
        self.free(pa, 1);
    }
    fn free_pages(&self, pa: u64, pages: usize) {
        self.free(pa, pages);
    }
    fn table(&self, pa: u64) -> *const AtomicU64 {
        pa as *const AtomicU64
    }
}

/// The table tests' arena allocator: it panics when a freed page is read, but the model checks
/// `is_freed` before every read.
impl ModelMemory for TestAlloc {
    fn table(&self, pa: u64) -> *const AtomicU64 {
        PageAllocator::table(self, pa)
    }
    fn is_freed(&self, pa: u64) -> bool {
        TestAlloc::is_freed(self, pa)
    }
}

impl Drop for TestMem {
    fn drop(&mut self) {
        for &(p, pages) in &self.inner.get_mut().unwrap().blocks {
            let bytes = pages * PAGE as usize;
            let layout = std::alloc::Layout::from_size_align(bytes, bytes).unwrap();
            // SAFETY: allocated in `alloc` with this layout, released once, here.
            unsafe { std::alloc::dealloc(p as *mut u8, layout) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: u64 = DESC_VALID | DESC_TABLE_OR_PAGE;
    /// Normal WB memory, RW, AF, inner shareable.
    const RW: u64 = (0b1111 << 2) | (0b11 << 6) | (0b11 << 8) | (1 << 10);
    const RO: u64 = (0b1111 << 2) | (0b01 << 6) | (0b11 << 8) | (1 << 10);
    const PAGE_DESC: u64 = DESC_VALID | DESC_TABLE_OR_PAGE;
    const BLOCK_DESC: u64 = DESC_VALID;

    fn idx(level: u8, ipa: u64) -> usize {
        ((ipa >> shift(level)) & 511) as usize
    }

    /// A 40-bit stage 2 (two concatenated level-1 roots) mapping:
    /// page 0x8000_1000 -> 0x5000_1000 (RW) and page 0x8000_2000 -> 0x5000_2000 (RW) through
    /// L2/L3 tables, and a 2 MiB block 0x8020_0000 -> 0x6000_0000.
    struct Hand {
        mem: Arc<TestMem>,
        root: u64,
        l2: u64,
        l3: u64,
        tlb: ModelTlb,
    }

    fn hand() -> Hand {
        let mem = TestMem::new(false);
        let root = mem.alloc(2);
        let l2 = mem.alloc(1);
        let l3 = mem.alloc(1);
        // Level 1 with 40 bits: 1024 entries over two pages; index = IPA[39:30].
        mem.set(root, (0x8000_0000u64 >> 30) as usize, l2 | TABLE);
        mem.set(l2, idx(2, 0x8000_0000), l3 | TABLE);
        mem.set(l3, idx(3, 0x8000_1000), 0x5000_1000 | RW | PAGE_DESC);
        mem.set(l3, idx(3, 0x8000_2000), 0x5000_2000 | RW | PAGE_DESC);
        mem.set(l2, idx(2, 0x8020_0000), 0x6000_0000 | RW | BLOCK_DESC);
        let tlb = ModelTlb::new(
            mem.clone(),
            Root {
                pa: root,
                start_level: 1,
                ipa_bits: 40,
            },
            1,
        );
        Hand {
            mem,
            root,
            l2,
            l3,
            tlb,
        }
    }

    fn inv(range: Option<(u64, u64)>, leaf_only: bool, level: u8) -> Invalidation {
        Invalidation {
            vmid: 1,
            range,
            leaf_only,
            level,
        }
    }

    fn run(tlb: &ModelTlb, i: Invalidation) {
        tlb.invalidate(&i);
        tlb.sync(1).unwrap();
    }

    #[test]
    fn walks_and_caches() {
        let h = hand();
        assert_eq!(h.tlb.access(0x8000_1234), Some((0x5000_1234, RW, 3)));
        assert_eq!(h.tlb.access(0x8021_0008), Some((0x6001_0008, RW, 2)));
        assert_eq!(h.tlb.access(0x8000_3000), None);
        assert_eq!(h.tlb.access(0x1_0000_0000), None);
        let s = h.tlb.stats();
        assert_eq!((s.leaves, s.walk_entries), (2, 2));
        // The second access to the page hits; a neighbour page starts from the cached L3 table.
        assert_eq!(h.tlb.access(0x8000_1000), Some((0x5000_1000, RW, 3)));
        assert_eq!(h.tlb.access_va(0x8000_2010), Some((0x5000_2010, RW)));
        assert_eq!(h.tlb.access_va(0x8000_2020), Some((0x5000_2020, RW)));
        let s = h.tlb.stats();
        assert_eq!((s.hits, s.combined), (2, 1));
        assert!(h.tlb.check_coherent().is_ok());
        let _ = (h.root, h.l2, h.l3);
    }

    #[test]
    fn passes_a_correct_sequence() {
        let h = hand();
        h.tlb.access(0x8000_1000);
        h.tlb.access_va(0x8000_2000);
        h.tlb.access(0x8020_0000);
        // Unmap one page: clear it, leaf invalidation at level 3.
        h.mem.set(h.l3, idx(3, 0x8000_1000), 0);
        run(&h.tlb, inv(Some((0x8000_1000, 0x8000_2000)), true, 3));
        h.tlb.check_coherent().unwrap();
        // Make the other page read-only.
        h.mem
            .set(h.l3, idx(3, 0x8000_2000), 0x5000_2000 | RO | PAGE_DESC);
        run(&h.tlb, inv(Some((0x8000_2000, 0x8000_3000)), true, 3));
        h.tlb.check_coherent().unwrap();
        assert_eq!(h.tlb.access_va(0x8000_2000), Some((0x5000_2000, RO)));
        // Unmap it and free the now-empty L3 table: table invalidation, then free.
        h.mem.set(h.l3, idx(3, 0x8000_2000), 0);
        h.mem.set(h.l2, idx(2, 0x8000_0000), 0);
        run(&h.tlb, inv(Some((0x8000_0000, 0x8020_0000)), false, 2));
        h.mem.free(h.l3, 1);
        h.tlb.check_coherent().unwrap();
        // The block is still cached and still right.
        assert_eq!(h.tlb.access(0x8020_0000), Some((0x6000_0000, RW, 2)));
        assert!(h.tlb.stats().hits >= 1);
        h.tlb.check_coherent().unwrap();
    }

    #[test]
    fn catches_a_missing_invalidation() {
        let h = hand();
        h.tlb.access(0x8000_1000);
        h.mem.set(h.l3, idx(3, 0x8000_1000), 0);
        h.tlb.sync(1).unwrap();
        let e = h.tlb.check_coherent().unwrap_err();
        assert!(e.contains("stale level-3 TLB entry"), "{e}");
        // A too-narrow range misses it as well.
        run(&h.tlb, inv(Some((0x8000_2000, 0x8000_3000)), true, 3));
        assert!(h.tlb.check_coherent().is_err());
        run(&h.tlb, inv(Some((0x8000_1000, 0x8000_2000)), true, 3));
        h.tlb.check_coherent().unwrap();
    }

    #[test]
    fn catches_a_missing_sync() {
        let h = hand();
        h.tlb.access(0x8000_1000);
        h.mem.set(h.l3, idx(3, 0x8000_1000), 0);
        h.tlb
            .invalidate(&inv(Some((0x8000_1000, 0x8000_2000)), true, 3));
        assert!(h.tlb.check_coherent().unwrap_err().contains("not synced"));
    }

    #[test]
    fn catches_a_leaf_only_invalidation_after_a_table_was_freed() {
        let h = hand();
        h.tlb.access(0x8000_1000);
        // Remove the L3 table, but invalidate as if only leaves changed, then free it.
        h.mem.set(h.l2, idx(2, 0x8000_0000), 0);
        run(&h.tlb, inv(Some((0x8000_0000, 0x8020_0000)), true, 0));
        h.mem.free(h.l3, 1);
        let e = h.tlb.check_coherent().unwrap_err();
        assert!(e.contains("freed"), "{e}");
        // The hardware would now walk the freed page from its walk cache.
        let h2 = hand();
        h2.tlb.access(0x8000_1000);
        h2.mem.set(h2.l2, idx(2, 0x8000_0000), 0);
        run(&h2.tlb, inv(Some((0x8000_0000, 0x8020_0000)), true, 0));
        h2.mem.free(h2.l3, 1);
        assert_eq!(h2.tlb.access(0x8000_3000), None);
        assert!(h2.tlb.check_coherent().unwrap_err().contains("freed"));
    }

    #[test]
    fn catches_a_wrong_level_hint() {
        let h = hand();
        h.tlb.access(0x8020_0000);
        // Replace the block by nothing but claim the change was at level 3.
        h.mem.set(h.l2, idx(2, 0x8020_0000), 0);
        run(&h.tlb, inv(Some((0x8020_0000, 0x8040_0000)), true, 3));
        assert!(h.tlb.check_coherent().is_err());
        run(&h.tlb, inv(Some((0x8020_0000, 0x8040_0000)), true, 2));
        h.tlb.check_coherent().unwrap();
    }

    #[test]
    fn a_block_split_into_equal_pages_is_coherent() {
        let h = hand();
        h.tlb.access(0x8020_0000);
        let t = h.mem.alloc(1);
        for i in 0..512u64 {
            h.mem
                .set(t, i as usize, (0x6000_0000 + i * PAGE) | RW | PAGE_DESC);
        }
        h.mem.set(h.l2, idx(2, 0x8020_0000), t | TABLE);
        h.tlb.check_coherent().unwrap();
        // But a changed page inside it makes the cached block stale until invalidated.
        h.mem.set(t, 7, 0);
        assert!(h.tlb.check_coherent().is_err());
        run(&h.tlb, inv(Some((0x8020_7000, 0x8020_8000)), true, 0));
        h.tlb.check_coherent().unwrap();
    }

    #[test]
    fn combined_entries_go_with_covering_or_full_invalidations() {
        let h = hand();
        h.tlb.access_va(0x8000_1000);
        h.tlb.access_va(0x8000_2000);
        h.mem
            .set(h.l3, idx(3, 0x8000_1000), 0x5000_9000 | RW | PAGE_DESC);
        h.mem
            .set(h.l3, idx(3, 0x8000_2000), 0x5000_a000 | RW | PAGE_DESC);
        run(&h.tlb, inv(Some((0x8000_1000, 0x8000_2000)), true, 3));
        // The combined entry of the second page is still stale.
        let e = h.tlb.check_coherent().unwrap_err();
        assert!(e.contains("0x80002000"), "{e}");
        run(&h.tlb, inv(None, false, 0));
        h.tlb.check_coherent().unwrap();
        assert_eq!(h.tlb.stats().combined, 0);
        assert_eq!(h.tlb.access_va(0x8000_2000), Some((0x5000_a000, RW)));
    }

    // ---- against the real table ----

    use crate::mm::pgtable::Attrs;
    use crate::mm::stage2::table::{SplitPolicy, Stage2, Stage2Config, Stage2Table};
    use crate::mm::stage2::tlb::TlbGather;

    /// xorshift64*: deterministic, good enough to pick operations.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    const BASE: u64 = 0x8000_0000;
    /// Eight 2 MiB blocks: room for blocks, splits, and tables that become empty.
    const WINDOW: u64 = 16 << 20;
    const BLOCK: u64 = 2 << 20;

    /// A random range in the window: a page, a run of pages, an aligned block, or a run of up
    /// to 1024 pages anywhere (crossing blocks, big enough to make the gather a full flush).
    fn range(rng: &mut Rng) -> (u64, u64) {
        let page = BASE + rng.below(WINDOW / PAGE) * PAGE;
        let (ipa, size) = match rng.below(4) {
            0 => (page, PAGE),
            1 => (page, (1 + rng.below(64)) * PAGE),
            2 => (BASE + rng.below(WINDOW / BLOCK) * BLOCK, BLOCK),
            _ => (page, (1 + rng.below(1024)) * PAGE),
        };
        (ipa, size.min(BASE + WINDOW - ipa))
    }

    fn touch(rng: &mut Rng, model: &ModelTlb) {
        for _ in 0..8 {
            let ipa = BASE + rng.below(WINDOW);
            if rng.below(2) == 0 {
                model.access(ipa);
            } else {
                model.access_va(ipa);
            }
        }
    }

    /// An agent that passes a changed invalidation on to the model: a deliberately broken
    /// backend (or gather), to show the random test catches it.
    struct Mutated {
        model: Arc<ModelTlb>,
        mutate: fn(&mut Invalidation),
    }

    impl TlbBackend for Mutated {
        fn invalidate(&self, inv: &Invalidation) {
            let mut inv = *inv;
            (self.mutate)(&mut inv);
            self.model.invalidate(&inv);
        }
        fn sync(&self, vmid: u16) -> Result<(), TlbError> {
            self.model.sync(vmid)
        }
        fn name(&self) -> &str {
            "mutated model"
        }
    }

    /// Random map/unmap/protect on a real `Stage2` whose only agent is the model (through
    /// `mutate` when given), touching random IPAs between operations (also between an operation
    /// and its sync, where stale entries are still allowed) and checking the model after every
    /// sync. Returns the first incoherence, with the operations that led to it.
    fn random_ops<M>(
        mem: Arc<M>,
        split: SplitPolicy,
        seed: u64,
        steps: usize,
        mutate: Option<fn(&mut Invalidation)>,
    ) -> Result<ModelStats, String>
    where
        M: ModelMemory + PageAllocator + 'static,
    {
        let cfg = Stage2Config {
            ipa_bits: 40,
            split,
            coherent_walk: true,
        };
        let table = Stage2Table::new(cfg, mem.clone(), ()).unwrap();
        let root = Root {
            pa: table.root_pa(),
            start_level: table.start_level() as u8,
            ipa_bits: table.ipa_bits(),
        };
        let model = Arc::new(ModelTlb::new(mem.clone(), root, 9));
        let agent: Arc<dyn TlbBackend> = match mutate {
            None => model.clone(),
            Some(mutate) => Arc::new(Mutated {
                model: model.clone(),
                mutate,
            }),
        };
        let s2 = Stage2::new(table, 9, vec![agent]);
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut gather = TlbGather::new();
        let mut log: Vec<String> = Vec::new();
        for step in 0..steps {
            touch(&mut rng, &model);
            let (ipa, size) = range(&mut rng);
            let attrs = if rng.below(2) == 0 {
                Attrs::RW
            } else {
                Attrs::RO
            };
            match rng.below(3) {
                0 => {
                    // PA congruent to the IPA modulo 2 MiB, so aligned ranges can use blocks.
                    let pa = 0x10_0000_0000 + (rng.below(1 << 16) << 21) + (ipa & (BLOCK - 1));
                    let r = s2.table.map(ipa, pa, size, attrs);
                    log.push(format!(
                        "map {ipa:#x}+{size:#x} -> {pa:#x} {attrs:?}: {r:?}"
                    ));
                }
                1 => {
                    let r = s2.unmap(ipa, size, &mut gather);
                    log.push(format!("unmap {ipa:#x}+{size:#x}: {r:?}"));
                }
                _ => {
                    let r = s2.protect(ipa, size, attrs, &mut gather);
                    log.push(format!("protect {ipa:#x}+{size:#x} {attrs:?}: {r:?}"));
                }
            }
            touch(&mut rng, &model);
            if rng.below(3) != 0 || step + 1 == steps {
                s2.sync(&mut gather).unwrap();
                log.push("sync".into());
                let fail = |e: String| {
                    let tail = log[log.len().saturating_sub(12)..].join("\n  ");
                    format!("{split:?} seed {seed} step {step}: {e}\nlast operations:\n  {tail}")
                };
                model.check_coherent().map_err(fail)?;
                // What the model hands out now agrees with the table's own walk.
                for _ in 0..8 {
                    let ipa = BASE + rng.below(WINDOW);
                    let got = model.access(ipa).map(|(pa, _, _)| pa);
                    let want = s2.table.translate(ipa).map(|(pa, _, _)| pa);
                    if got != want {
                        return Err(fail(format!("{ipa:#x}: model {got:#x?}, table {want:#x?}")));
                    }
                }
            }
        }
        Ok(model.stats())
    }

    const POLICIES: [SplitPolicy; 3] = [
        SplitPolicy::Direct,
        SplitPolicy::BreakBeforeMake,
        SplitPolicy::NoLiveSplits,
    ];

    #[test]
    fn random_operations_on_the_real_table_stay_coherent() {
        for split in POLICIES {
            for seed in 0..6 {
                // Quarantined pages: a walk through a freed table is reported as such.
                let mem = TestMem::new(false);
                let stats = random_ops(mem.clone(), split, seed, 300, None).unwrap();
                assert!(stats.hits > 0 && stats.walks > 0, "{stats:?}");
                assert_eq!(mem.live_pages(), 0, "table pages leaked");
                // Reused pages: a stale walk cache would now translate through someone else's
                // table.
                random_ops(TestMem::new(true), split, seed + 100, 300, None).unwrap();
                // The table tests' arena allocator.
                let arena = Arc::new(TestAlloc::new(8192));
                random_ops(arena, split, seed + 200, 300, None).unwrap();
            }
        }
    }

    #[test]
    fn the_random_test_catches_broken_invalidations() {
        type Mutation = (&'static str, fn(&mut Invalidation));
        let mutations: [Mutation; 4] = [
            ("table changes passed as leaf-only", |i| i.leaf_only = true),
            ("ranges one page short", |i| {
                if let Some((s, e)) = i.range.as_mut()
                    && *e - *s > PAGE
                {
                    *e -= PAGE;
                }
            }),
            ("every hint says level 3", |i| i.level = 3),
            ("full flushes dropped", |i| {
                if i.range.is_none() {
                    i.range = Some((0, 0));
                }
            }),
        ];
        for (what, mutate) in mutations {
            let caught = POLICIES.iter().any(|&split| {
                (0..6).any(|seed| {
                    random_ops(TestMem::new(false), split, seed, 300, Some(mutate)).is_err()
                })
            });
            assert!(caught, "not caught: {what}");
        }
    }

    #[test]
    fn freeing_unlinked_tables_before_the_sync_is_caught() {
        let mem = TestMem::new(false);
        let cfg = Stage2Config {
            ipa_bits: 40,
            split: SplitPolicy::Direct,
            coherent_walk: true,
        };
        let table = Stage2Table::new(cfg, mem.clone(), ()).unwrap();
        let root = Root {
            pa: table.root_pa(),
            start_level: table.start_level() as u8,
            ipa_bits: 40,
        };
        let model = ModelTlb::new(mem.clone(), root, 9);
        table.map(BASE, 0x5000_0000, 16 * PAGE, Attrs::RW).unwrap();
        let got = model.access(BASE + PAGE).map(|(pa, _, level)| (pa, level));
        assert_eq!(got, Some((0x5000_1000, 3)));
        // Unmapping the whole 2 MiB span unlinks the level-3 table; freeing it without
        // invalidating leaves the walk cache pointing at a freed page.
        let mut gather = TlbGather::new();
        table.unmap(BASE, BLOCK, &mut gather).unwrap();
        table.free_deferred(gather.take_freed());
        let e = model.check_coherent().unwrap_err();
        assert!(e.contains("freed") || e.contains("stale"), "{e}");
    }
}
