//! A VM's stage-2 translation table (AArch64 VMSA, 4 KiB granule), changed without locks while
//! the CPUs and the SMMUs walk it.
//!
//! # Contract
//!
//! This is the contract Linux's `io-pgtable-arm` gives its IOMMU drivers, adapted to a
//! hypervisor that shares one table between the CPUs' stage 2 and the SMMUs:
//!
//! - **No operation takes a lock.** Every descriptor is an `AtomicU64`. `map`, `unmap`, `protect`
//!   and `translate` on *non-overlapping* IPA ranges may run at the same time on any CPUs, also
//!   when they share intermediate tables. Operations whose ranges overlap must not run at the same
//!   time: that is the caller's bug (the caller owns the IPA space, as a driver owns its IOVAs).
//!   Debug builds keep a registry of the ranges in flight and panic with "overlapping concurrent
//!   stage-2 operations" when one arrives that overlaps another; that registry uses a spin lock,
//!   but it exists only with `debug_assertions` (and never under loom), so release builds have no
//!   lock anywhere (table pages come from a [`PageAllocator`]; put a [`PagePool`] in front of a
//!   locking frame allocator). A software walk ([`Stage2Table::translate`]) counts as an operation on the
//!   address it translates: translating an address that another CPU is unmapping can reach a
//!   table that the unmap frees.
//! - **Tables are installed with compare-and-swap.** An operation that needs a table where the
//!   entry is empty allocates one, makes it visible to the walkers, and CASes it in (Release; every
//!   load that may descend is Acquire). The loser of a race frees its own table (nobody ever saw
//!   it) and descends into the winner's. Tables that merely become empty stay in place, as in
//!   Linux: removing them would race with CPUs descending into them.
//! - **`map` never overwrites.** It uses the largest block that size and alignment allow (1 GiB
//!   at level 1, 2 MiB at level 2, else 4 KiB pages; pages only under
//!   [`SplitPolicy::NoLiveSplits`]), and first checks that the whole range is unmapped, so an
//!   error leaves the table unchanged (barring overlapping concurrent operations). Where an empty
//!   table is left from earlier unmaps, `map` descends into it and uses smaller mappings there:
//!   replacing a table with a block would need walk-cache maintenance that `map` has no gather for.
//! - **`unmap` and `protect` never invalidate anything themselves.** They record what they changed
//!   in a [`TlbGather`]; [`Stage2::sync`] invalidates that on every agent (CPUs, SMMUs), waits for
//!   them, and only then frees the table pages the batch unlinked. A leaf is removed by clearing
//!   it (`add_leaf`); an unmap that covers the whole span of a table entry clears that entry
//!   (`add_table`: walk caches too) and queues every table page below it for freeing after the
//!   sync (`defer_free`): a hardware walker may be inside that subtree until the invalidation
//!   completes. Table pages are freed only there ([`Stage2Table::free_deferred`]), when a losing
//!   table was never published, or when the whole table is dropped.
//! - **Partial unmap or protect of a block splits it**: a next-level table reproducing the block
//!   is built, then swapped in for the block, then the operation continues in it. How the swap is
//!   done is the [`SplitPolicy`], below. `protect` changes only permissions (S2AP, XN), which needs
//!   no break-before-make; it refuses to change the memory type and refuses unmapped parts, and it
//!   checks the whole range first, so such an error changes nothing.
//!
//! # Why a table is never freed early
//!
//! Only an operation whose range covers a table's whole span unlinks it, and every other
//! operation's range is disjoint from that span, so no other *software* operation can be inside a
//! table that is being unlinked. The hardware walkers can be: they may have cached the table
//! entry, or be halfway through a walk. So the page goes into the gather and is freed after the
//! TLB/walk-cache invalidation of that range has completed on every agent.
//!
//! # Splitting a live block: the break-before-make policy
//!
//! Replacing a valid block with a table that maps the same addresses is a "change of block size",
//! which the architecture allows without break-before-make only with FEAT_BBM level 2 (CPU
//! `ID_AA64MMFR2_EL1.BBM`) and, for an SMMU, `IDR3.BBML` = 2; otherwise the TLBs may hold both
//! translations and raise TLB conflict aborts.
//!
//! - [`SplitPolicy::Direct`]: every walker supports level 2: CAS(block → table) in one step. A
//!   concurrent split of the same block by another CPU (unmapping another page of it) is resolved
//!   like a table install race: the loser frees its copy and descends into the winner's. The gather
//!   records the block's range as a non-leaf change.
//! - [`SplitPolicy::BreakBeforeMake`]: CAS(block → *splitting marker*), an invalid descriptor
//!   (bit 0 clear, so the walkers treat it as a fault) carrying the old block and the software bit
//!   55; then the break is made visible — [`BreakSync::break_sync`] invalidates the block on every
//!   agent and waits ([`Stage2::unmap`]/[`Stage2::protect`] pass one); on a bare table without a
//!   hook it is only recorded in the gather, which is right only when no agent walks the table
//!   (host tests) — then the table is stored. Another CPU that meets the marker spins (bounded,
//!   `spin_loop`) until it turns into the table and then descends: this is the only wait in the
//!   module, and it happens only under this policy when two CPUs split the same block at once. A
//!   software walk that meets the marker reports the block it stands for. A guest access that
//!   faults on it must be retried (the stage-2 abort handler sees a translation fault on an IPA
//!   that `translate` reports as mapped: return to the guest).
//! - [`SplitPolicy::NoLiveSplits`]: for walkers without BBM level 2 that must never see a live
//!   split, not even as a transient fault: `map` uses 4 KiB pages only, so no block exists to be
//!   split; an operation that would split returns [`MapError::WouldSplit`].
//!
//! # Walkers that do not snoop the caches
//!
//! Before a table is linked in (a new one, or a split's copy), [`WalkerSync::publish_barrier`]
//! runs (DSB ISHST on hardware) so that the walkers observe the table's contents before the entry
//! that points at it; `map` ends with one more, so its leaves are visible when it returns. When the
//! configuration says the walk is not cache coherent (an SMMU without `IDR0.COHACC`, or one whose
//! table walks are configured non-cacheable), a new table page is cleaned to the point of coherency
//! as a whole before it is published, and every entry is cleaned after it is written or swapped,
//! as Linux does on its non-coherent path. The TLB sync that follows an unmap provides the final
//! barrier.
//!
//! # Errors in the middle
//!
//! `unmap` and `protect` may fail after changing part of the range (no memory for a split). What
//! they changed is in the gather, which must still be synced. `map` may fail with
//! [`MapError::NoMemory`] after mapping part of the range; the caller undoes that with `unmap`
//! (and a sync) of the range, as Linux's `iommu_map` does.

use alloc::{sync::Arc, vec::Vec};
use core::cell::Cell;
use core::fmt;

#[cfg(doc)]
use super::pool::PagePool;
use super::sync::{AtomicU64, BITS_PER_LEVEL, Ordering, spin_loop};
use super::tlb::{Invalidation, TlbBackend, TlbError, TlbGather};
use crate::mm::pgtable::{ADDR_MASK, Attrs, DESC_TABLE_OR_PAGE, DESC_VALID, MapError, Regime};

const PAGE_SHIFT: u32 = 12;
const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Entries in one table (512; 4 under loom).
pub const TABLE_ENTRIES: usize = 1 << BITS_PER_LEVEL;
/// Bytes of one table as the walkers see it (a 4 KiB page; smaller under loom).
const TABLE_BYTES: usize = TABLE_ENTRIES * 8;
/// At most this many root tables may be concatenated (VTCR_EL2, SMMU S2SL0).
pub const MAX_CONCATENATED: usize = 16;
/// Software bit (ignored by hardware, in valid and invalid descriptors) marking an invalid entry as
/// a block being split under break-before-make.
const SW_SPLITTING: u64 = 1 << 55;
/// Permission bits of a stage-2 leaf: S2AP\[7:6\] and XN\[54:53\].
const PERM_MASK: u64 = (0b11 << 6) | (0b11 << 53);
/// How long a CPU waits for another CPU's break-before-make split before it gives up (the other
/// CPU must have died: the split is a TLB sync long).
const SPLIT_WAIT_SPINS: u64 = 1 << 32;

/// Smallest and largest supported IPA sizes.
#[cfg(not(loom))]
pub const IPA_BITS_RANGE: core::ops::RangeInclusive<u32> = 32..=48;
#[cfg(loom)]
pub const IPA_BITS_RANGE: core::ops::RangeInclusive<u32> =
    (PAGE_SHIFT + 2 * BITS_PER_LEVEL)..=(PAGE_SHIFT + 4 * BITS_PER_LEVEL);

/// Bit position of the address bits a level's entries translate.
const fn level_shift(level: u32) -> u32 {
    PAGE_SHIFT + BITS_PER_LEVEL * (3 - level)
}

/// Bytes one entry at `level` maps: 1 GiB at level 1, 2 MiB at level 2, 4 KiB at level 3
/// (scaled down under loom).
pub const fn level_size(level: u32) -> u64 {
    1 << level_shift(level)
}

/// Start level and number of concatenated root tables for an `ipa_bits` stage 2, as VTCR_EL2
/// (T0SZ, SL0) and the SMMU's S2T0SZ/S2SL0 require: the fewest levels, starting one level lower
/// with up to 16 concatenated root tables when that saves a level. `None` when unsupported.
pub fn stage2_geometry(ipa_bits: u32) -> Option<(u32, usize)> {
    if !IPA_BITS_RANGE.contains(&ipa_bits) {
        return None;
    }
    // Levels needed with a single (possibly partial) root table.
    let levels = (ipa_bits - PAGE_SHIFT).div_ceil(BITS_PER_LEVEL);
    let start = 4 - levels;
    if start < 2 {
        // The root one level down needs 2^concat_bits tables.
        let concat_bits = ipa_bits - level_shift(start + 1) - BITS_PER_LEVEL;
        if 1usize << concat_bits <= MAX_CONCATENATED {
            return Some((start + 1, 1 << concat_bits));
        }
    }
    Some((start, 1))
}

/// How a live block is replaced by a table (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitPolicy {
    /// All walkers implement FEAT_BBM level 2 (CPU `ID_AA64MMFR2_EL1.BBM` ≥ 2, SMMU `IDR3.BBML`
    /// ≥ 2): swap block → table in one step.
    Direct,
    /// Block → invalid marker, invalidate and sync, then marker → table.
    BreakBeforeMake,
    /// Map pages only, so nothing is ever split while live.
    NoLiveSplits,
}

/// How a stage-2 table is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage2Config {
    /// IPA size (32..=48 bits).
    pub ipa_bits: u32,
    pub split: SplitPolicy,
    /// True when every walker snoops the CPU caches for table walks.
    pub coherent_walk: bool,
}

/// Table memory: physical addresses of zeroed 4 KiB pages, and where to access them.
///
/// The table trusts an implementation: a page handed out must stay valid and exclusively the
/// table's until it is freed, and [`PageAllocator::table`] must return a pointer to its entries
/// (for a block of `n` pages from `alloc_pages`, `n` × 512 contiguous entries).
pub trait PageAllocator: Send + Sync {
    /// A zeroed page, 4 KiB aligned.
    fn alloc_page(&self) -> Option<u64>;
    /// `pages` contiguous zeroed pages aligned to `pages` × 4 KiB (a concatenated root).
    fn alloc_pages(&self, pages: usize) -> Option<u64>;
    fn free_page(&self, pa: u64);
    fn free_pages(&self, pa: u64, pages: usize);
    /// The table's entries (512 per page).
    fn table(&self, pa: u64) -> *const AtomicU64;
}

impl<T: PageAllocator + ?Sized> PageAllocator for &T {
    fn alloc_page(&self) -> Option<u64> {
        (**self).alloc_page()
    }
    fn alloc_pages(&self, pages: usize) -> Option<u64> {
        (**self).alloc_pages(pages)
    }
    fn free_page(&self, pa: u64) {
        (**self).free_page(pa)
    }
    fn free_pages(&self, pa: u64, pages: usize) {
        (**self).free_pages(pa, pages)
    }
    fn table(&self, pa: u64) -> *const AtomicU64 {
        (**self).table(pa)
    }
}

impl<T: PageAllocator + ?Sized> PageAllocator for Arc<T> {
    fn alloc_page(&self) -> Option<u64> {
        (**self).alloc_page()
    }
    fn alloc_pages(&self, pages: usize) -> Option<u64> {
        (**self).alloc_pages(pages)
    }
    fn free_page(&self, pa: u64) {
        (**self).free_page(pa)
    }
    fn free_pages(&self, pa: u64, pages: usize) {
        (**self).free_pages(pa, pages)
    }
    fn table(&self, pa: u64) -> *const AtomicU64 {
        (**self).table(pa)
    }
}

/// Hooks for hardware walkers: a barrier before publishing an entry, and cleaning to the point of
/// coherency for walkers that are not cache coherent.
pub trait WalkerSync: Send + Sync {
    /// Makes earlier table writes visible to the walkers before the next entry is published (DSB
    /// ISHST on hardware).
    fn publish_barrier(&self) {}
    /// Cleans `[addr, addr + len_bytes)` to the point of coherency (DC CVAC on hardware). Only
    /// called when the configuration is not `coherent_walk`.
    fn clean(&self, _addr: *const AtomicU64, _len_bytes: usize) {}
}

/// No hardware walker to synchronise with (host tests, tables not yet in use).
impl WalkerSync for () {}

/// Makes the "break" of a break-before-make split visible before the "make".
pub trait BreakSync {
    /// The block mapping `[ipa, ipa + size)` at `level` was just replaced by an invalid entry:
    /// invalidate it on every agent that may cache it and wait for that to complete.
    fn break_sync(&self, ipa: u64, size: u64, level: u32);
}

/// What an entry holds.
#[derive(Clone, Copy, Debug)]
enum Entry {
    Empty,
    Table(u64),
    Leaf(u64),
    /// A block being split under break-before-make; holds the block's descriptor.
    Splitting(u64),
}

fn classify(desc: u64, level: u32) -> Entry {
    if desc & DESC_VALID == 0 {
        if desc & SW_SPLITTING != 0 {
            Entry::Splitting((desc | DESC_VALID) & !SW_SPLITTING)
        } else {
            debug_assert_eq!(desc, 0, "unknown invalid stage-2 descriptor");
            Entry::Empty
        }
    } else if level < 3 && desc & DESC_TABLE_OR_PAGE != 0 {
        Entry::Table(desc & ADDR_MASK)
    } else {
        Entry::Leaf(desc)
    }
}

fn table_desc(pa: u64) -> u64 {
    pa | DESC_VALID | DESC_TABLE_OR_PAGE
}

/// Outcome of [`Stage2Table::map_single`].
enum Single {
    Done,
    Mapped(u64),
    NoMemory,
    General,
}

enum Walk {
    Hole { level: u32 },
    Leaf { desc: u64, level: u32 },
}

/// Stands in for the debug registry's guard in release builds.
#[cfg(not(all(debug_assertions, not(loom))))]
struct NoGuard;

/// A VM's stage-2 translation table. See the module docs for the concurrency contract.
pub struct Stage2Table<A: PageAllocator, W: WalkerSync> {
    alloc: A,
    walker: W,
    cfg: Stage2Config,
    root: u64,
    root_pages: usize,
    root_entries: usize,
    start_level: u32,
    #[cfg(all(debug_assertions, not(loom)))]
    in_flight: in_flight::InFlight,
}

impl<A: PageAllocator, W: WalkerSync> Stage2Table<A, W> {
    /// An empty table for `cfg.ipa_bits` of IPA; the root is `concatenated_tables()` pages from
    /// `alloc.alloc_pages`.
    pub fn new(cfg: Stage2Config, alloc: A, walker: W) -> Result<Self, MapError> {
        let (start_level, root_pages) = stage2_geometry(cfg.ipa_bits)
            .ok_or(MapError::UnsupportedInputSize { bits: cfg.ipa_bits })?;
        let root = alloc.alloc_pages(root_pages).ok_or(MapError::NoMemory)?;
        debug_assert_eq!(
            root % (root_pages as u64 * PAGE_SIZE),
            0,
            "root not aligned"
        );
        let root_entries = 1usize << (cfg.ipa_bits - level_shift(start_level));
        let table = Self {
            alloc,
            walker,
            cfg,
            root,
            root_pages,
            root_entries,
            start_level,
            #[cfg(all(debug_assertions, not(loom)))]
            in_flight: in_flight::InFlight::new(),
        };
        if !cfg.coherent_walk {
            table
                .walker
                .clean(table.alloc.table(root), root_pages * TABLE_BYTES);
        }
        table.walker.publish_barrier();
        Ok(table)
    }

    /// Physical address of the root (VTTBR_EL2.BADDR, SMMU S2TTB).
    pub fn root_pa(&self) -> u64 {
        self.root
    }

    /// The level translation starts at (VTCR_EL2.SL0, SMMU S2SL0).
    pub fn start_level(&self) -> u32 {
        self.start_level
    }

    /// IPA bits (T0SZ = 64 - this).
    pub fn ipa_bits(&self) -> u32 {
        self.cfg.ipa_bits
    }

    /// Number of root tables concatenated at the start level.
    pub fn concatenated_tables(&self) -> usize {
        self.root_pages
    }

    /// The configuration the table was built with.
    pub fn config(&self) -> Stage2Config {
        self.cfg
    }

    /// The page allocator.
    pub fn allocator(&self) -> &A {
        &self.alloc
    }

    /// Entry `index` of the table at `table`.
    fn entry(&self, table: u64, index: usize) -> &AtomicU64 {
        debug_assert!(index < TABLE_ENTRIES || (table == self.root && index < self.root_entries));
        // SAFETY: `table` is a table page of this tree that is still allocated: pages are freed
        // only when unlinked by an operation covering their whole span (and then only after the
        // sync), or when the tree is dropped; the caller's contract keeps any operation that
        // could reach `table` from overlapping that one. The allocator's contract makes
        // `table()` point at the page's entries, and `index` is within the table.
        unsafe { &*self.alloc.table(table).add(index) }
    }

    fn index(&self, level: u32, ipa: u64) -> usize {
        let entries = if level == self.start_level {
            self.root_entries
        } else {
            TABLE_ENTRIES
        };
        ((ipa >> level_shift(level)) as usize) & (entries - 1)
    }

    fn clean_entry(&self, entry: &AtomicU64) {
        if !self.cfg.coherent_walk {
            self.walker.clean(entry, 8);
        }
    }

    fn check_input(&self, ipa: u64, pa: u64, size: u64) -> Result<(), MapError> {
        if size == 0 || (ipa | pa | size) & (PAGE_SIZE - 1) != 0 {
            return Err(MapError::Unaligned { va: ipa, pa, size });
        }
        let limit = 1u64 << self.cfg.ipa_bits;
        if ipa >= limit || size > limit - ipa {
            return Err(MapError::OutOfRange {
                va: ipa,
                size,
                limit,
            });
        }
        Ok(())
    }

    #[cfg(all(debug_assertions, not(loom)))]
    fn begin(&self, ipa: u64, size: u64) -> in_flight::Guard<'_> {
        self.in_flight.enter(ipa, ipa + size)
    }

    #[cfg(not(all(debug_assertions, not(loom))))]
    fn begin(&self, _ipa: u64, _size: u64) -> NoGuard {
        NoGuard
    }

    /// Registers `[ipa, ipa + size)` as in flight, as an operation does (debug-registry tests).
    #[cfg(all(test, debug_assertions, not(loom)))]
    pub(crate) fn begin_for_test(&self, ipa: u64, size: u64) -> in_flight::Guard<'_> {
        self.begin(ipa, size)
    }

    // ---- map ----

    /// Maps `size` bytes at `ipa` to `pa` with the largest blocks alignment allows. The whole
    /// range must be unmapped ([`MapError::AlreadyMapped`] otherwise, with nothing changed).
    pub fn map(&self, ipa: u64, pa: u64, size: u64, attrs: Attrs) -> Result<(), MapError> {
        self.check_input(ipa, pa, size)?;
        match pa.checked_add(size) {
            Some(end) if end <= ADDR_MASK + PAGE_SIZE => {}
            _ => return Err(MapError::OutputOutOfRange { pa, size }),
        }
        let _op = self.begin(ipa, size);
        let bits = attrs.encode(Regime::Stage2);
        // Fast path: the range is exactly one page or block. One walk, one CAS: either the entry
        // was empty and now maps the range, or nothing changed.
        match self.map_single(ipa, pa, size, bits) {
            Single::Done => {
                self.walker.publish_barrier();
                return Ok(());
            }
            Single::Mapped(at) => return Err(MapError::AlreadyMapped { va: at }),
            Single::NoMemory => return Err(MapError::NoMemory),
            Single::General => {}
        }
        if let Some(at) = self.first_mapped(ipa, size) {
            return Err(MapError::AlreadyMapped { va: at });
        }
        let result = self.map_level(self.start_level, self.root, ipa, pa, size, bits);
        // Every new leaf is visible to the walkers before `map` returns (Linux: the final wmb).
        self.walker.publish_barrier();
        result
    }

    /// Maps `[ipa, ipa + size)` with a single leaf entry if the range is exactly one page or one
    /// block this table may use; [`Single::General`] when it is not (or when an empty table left
    /// by earlier unmaps sits where the block would go: then the general path maps pieces).
    fn map_single(&self, ipa: u64, pa: u64, size: u64, bits: u64) -> Single {
        let level = match size {
            s if s == level_size(3) => 3,
            s if s == level_size(2) && self.cfg.split != SplitPolicy::NoLiveSplits => 2,
            s if s == level_size(1) && self.cfg.split != SplitPolicy::NoLiveSplits => 1,
            _ => return Single::General,
        };
        if (ipa | pa) & (size - 1) != 0 || level < self.start_level {
            return Single::General;
        }
        let mut table = self.root;
        for l in self.start_level..level {
            let entry = self.entry(table, self.index(l, ipa));
            let cur = entry.load(Ordering::Acquire);
            table = match classify(cur, l) {
                Entry::Table(next) => next,
                Entry::Empty => match self.next_table(l, entry, cur, ipa) {
                    Ok(next) => next,
                    Err(MapError::NoMemory) => return Single::NoMemory,
                    Err(_) => return Single::Mapped(ipa),
                },
                Entry::Leaf(_) | Entry::Splitting(_) => return Single::Mapped(ipa),
            };
        }
        let kind = if level == 3 {
            DESC_VALID | DESC_TABLE_OR_PAGE
        } else {
            DESC_VALID
        };
        let entry = self.entry(table, self.index(level, ipa));
        match entry.compare_exchange(0, pa | bits | kind, Ordering::Release, Ordering::Acquire) {
            Ok(_) => {
                self.clean_entry(entry);
                Single::Done
            }
            Err(cur) if matches!(classify(cur, level), Entry::Table(_)) => Single::General,
            Err(_) => Single::Mapped(ipa),
        }
    }

    fn map_level(
        &self,
        level: u32,
        table: u64,
        mut ipa: u64,
        mut pa: u64,
        mut size: u64,
        bits: u64,
    ) -> Result<(), MapError> {
        let span = level_size(level);
        while size > 0 {
            let chunk = (span - (ipa & (span - 1))).min(size);
            let entry = self.entry(table, self.index(level, ipa));
            let block_ok = chunk == span
                && pa & (span - 1) == 0
                && (1..=2).contains(&level)
                && self.cfg.split != SplitPolicy::NoLiveSplits;
            let leaf = if level == 3 {
                Some(pa | bits | DESC_VALID | DESC_TABLE_OR_PAGE)
            } else if block_ok {
                Some(pa | bits | DESC_VALID)
            } else {
                None
            };
            let mut cur = 0;
            if let Some(desc) = leaf {
                match entry.compare_exchange(0, desc, Ordering::Release, Ordering::Acquire) {
                    Ok(_) => self.clean_entry(entry),
                    Err(actual) => cur = actual,
                }
            }
            if leaf.is_none() || cur != 0 {
                // Descend: into the table there (an empty one left by unmaps, or one another CPU
                // just installed for its own neighbouring range), or into a new one.
                let next = self.next_table(level, entry, cur, ipa)?;
                self.map_level(level + 1, next, ipa, pa, chunk, bits)?;
            }
            ipa += chunk;
            pa += chunk;
            size -= chunk;
        }
        Ok(())
    }

    /// The table `entry` points to, installing a new one if it is empty. `cur` is the value last
    /// read from `entry` (0 if none was read).
    fn next_table(
        &self,
        level: u32,
        entry: &AtomicU64,
        mut cur: u64,
        ipa: u64,
    ) -> Result<u64, MapError> {
        if cur == 0 {
            cur = entry.load(Ordering::Acquire);
        }
        loop {
            match classify(cur, level) {
                Entry::Table(next) => return Ok(next),
                Entry::Empty => {
                    let new = self.alloc.alloc_page().ok_or(MapError::NoMemory)?;
                    match self.install(entry, 0, new) {
                        Ok(()) => return Ok(new),
                        Err(actual) => {
                            // Lost the race: nobody saw our table.
                            self.alloc.free_page(new);
                            cur = actual;
                        }
                    }
                }
                // A mapping appeared after the check: an overlapping concurrent operation.
                Entry::Leaf(_) | Entry::Splitting(_) => {
                    return Err(MapError::AlreadyMapped { va: ipa });
                }
            }
        }
    }

    /// Publishes the (filled) table page `new` in `entry` if it still holds `expected`; else
    /// returns what it holds.
    fn install(&self, entry: &AtomicU64, expected: u64, new: u64) -> Result<(), u64> {
        if !self.cfg.coherent_walk {
            self.walker.clean(self.alloc.table(new), TABLE_BYTES);
        }
        self.walker.publish_barrier();
        let result = entry.compare_exchange(
            expected,
            table_desc(new),
            Ordering::Release,
            Ordering::Acquire,
        );
        // Clean even when we lost: the winner may not have cleaned yet (Linux: "just kick it").
        self.clean_entry(entry);
        result.map(|_| ())
    }

    /// First address in `[ipa, ipa + size)` that is mapped, if any.
    fn first_mapped(&self, ipa: u64, size: u64) -> Option<u64> {
        let end = ipa + size;
        let mut at = ipa;
        while at < end {
            match self.walk(at) {
                Walk::Leaf { .. } => return Some(at),
                Walk::Hole { level } => at = (at | (level_size(level) - 1)) + 1,
            }
        }
        None
    }

    fn walk(&self, ipa: u64) -> Walk {
        let mut table = self.root;
        let mut level = self.start_level;
        loop {
            let desc = self
                .entry(table, self.index(level, ipa))
                .load(Ordering::Acquire);
            match classify(desc, level) {
                Entry::Empty => return Walk::Hole { level },
                Entry::Table(next) => {
                    table = next;
                    level += 1;
                }
                Entry::Leaf(desc) | Entry::Splitting(desc) => return Walk::Leaf { desc, level },
            }
        }
    }

    /// Output address, attributes and leaf level (1 = 1 GiB block, 2 = 2 MiB block, 3 = page) of
    /// `ipa`, if mapped. A lock-free walk with Acquire loads.
    pub fn translate(&self, ipa: u64) -> Option<(u64, Attrs, u32)> {
        if ipa >> self.cfg.ipa_bits != 0 {
            return None;
        }
        match self.walk(ipa) {
            Walk::Hole { .. } => None,
            Walk::Leaf { desc, level } => {
                let offset = level_size(level) - 1;
                let pa = (desc & ADDR_MASK & !offset) | (ipa & offset);
                Some((pa, Attrs::decode(desc, Regime::Stage2), level))
            }
        }
    }

    // ---- splitting ----

    /// Replaces the block `cur` at `level` in `entry` (mapping `block_ipa`) by a table that maps the
    /// same, according to the split policy. Returns what `entry` holds afterwards (the new table,
    /// or whatever another CPU put there first).
    fn split(
        &self,
        level: u32,
        entry: &AtomicU64,
        cur: u64,
        block_ipa: u64,
        gather: &mut TlbGather,
        brk: Option<&dyn BreakSync>,
    ) -> Result<u64, MapError> {
        if self.cfg.split == SplitPolicy::NoLiveSplits {
            return Err(MapError::WouldSplit { va: block_ipa });
        }
        debug_assert!((1..=2).contains(&level), "block at level {level}");
        let size = level_size(level);
        let new = self.alloc.alloc_page().ok_or(MapError::NoMemory)?;
        self.fill_replica(new, level + 1, cur);
        match self.cfg.split {
            SplitPolicy::Direct => match self.install(entry, cur, new) {
                Ok(()) => {
                    gather.add_table(block_ipa, size, level as u8);
                    Ok(table_desc(new))
                }
                Err(actual) => {
                    self.alloc.free_page(new);
                    Ok(actual)
                }
            },
            SplitPolicy::BreakBeforeMake => {
                let marker = (cur & !DESC_VALID) | SW_SPLITTING;
                if let Err(actual) =
                    entry.compare_exchange(cur, marker, Ordering::AcqRel, Ordering::Acquire)
                {
                    self.alloc.free_page(new);
                    return Ok(actual);
                }
                // Break: the walkers see the fault entry, then nothing caches the block.
                self.clean_entry(entry);
                self.walker.publish_barrier();
                match brk {
                    Some(brk) => brk.break_sync(block_ipa, size, level),
                    None => gather.add_table(block_ipa, size, level as u8),
                }
                // Make. Nobody else writes an entry holding our marker.
                if !self.cfg.coherent_walk {
                    self.walker.clean(self.alloc.table(new), TABLE_BYTES);
                }
                self.walker.publish_barrier();
                entry.store(table_desc(new), Ordering::Release);
                self.clean_entry(entry);
                Ok(table_desc(new))
            }
            SplitPolicy::NoLiveSplits => unreachable!(),
        }
    }

    /// Fills the private table `table` at `level` with entries that map what `block` maps.
    fn fill_replica(&self, table: u64, level: u32, block: u64) {
        let base = block & ADDR_MASK;
        let attrs = block & !(ADDR_MASK | DESC_VALID | DESC_TABLE_OR_PAGE);
        let kind = if level == 3 {
            DESC_VALID | DESC_TABLE_OR_PAGE
        } else {
            DESC_VALID
        };
        let step = level_size(level);
        for i in 0..TABLE_ENTRIES {
            let desc = (base + i as u64 * step) | attrs | kind;
            self.entry(table, i).store(desc, Ordering::Relaxed);
        }
    }

    /// Waits until another CPU's break-before-make split of `entry` is made; returns the entry.
    fn wait_split(&self, entry: &AtomicU64) -> u64 {
        for _ in 0..SPLIT_WAIT_SPINS {
            let desc = entry.load(Ordering::Acquire);
            if desc & DESC_VALID != 0 || desc & SW_SPLITTING == 0 {
                return desc;
            }
            spin_loop();
        }
        panic!("stage-2 block split never completed");
    }

    // ---- unmap ----

    /// Unmaps whatever is mapped in `[ipa, ipa + size)`, recording the changes in `gather`.
    /// Returns the number of bytes that were mapped. Splits blocks that are partly covered; under
    /// [`SplitPolicy::BreakBeforeMake`] use [`Stage2::unmap`] (or [`Stage2Table::unmap_with`]) so
    /// that the break is invalidated on the agents.
    pub fn unmap(&self, ipa: u64, size: u64, gather: &mut TlbGather) -> Result<u64, MapError> {
        self.unmap_with(ipa, size, gather, None)
    }

    /// [`Stage2Table::unmap`] with the hook that makes break-before-make splits visible.
    pub fn unmap_with(
        &self,
        ipa: u64,
        size: u64,
        gather: &mut TlbGather,
        brk: Option<&dyn BreakSync>,
    ) -> Result<u64, MapError> {
        self.check_input(ipa, 0, size)?;
        let _op = self.begin(ipa, size);
        if let Some(bytes) = self.unmap_single(ipa, size, gather) {
            return Ok(bytes);
        }
        self.unmap_level(self.start_level, self.root, ipa, size, gather, brk)
    }

    /// Fast path of [`Stage2Table::unmap`]: the range is exactly one leaf entry (a page, or a
    /// block mapped as such). One walk, one store. `None` when the general path is needed (a
    /// table or a hole where the leaf should be, or a block to split).
    fn unmap_single(&self, ipa: u64, size: u64, gather: &mut TlbGather) -> Option<u64> {
        let target = (1..=3).find(|&l| level_size(l) == size)?;
        if ipa & (size - 1) != 0 || target < self.start_level {
            return None;
        }
        let mut table = self.root;
        let mut level = self.start_level;
        loop {
            let entry = self.entry(table, self.index(level, ipa));
            match classify(entry.load(Ordering::Acquire), level) {
                Entry::Table(next) if level < target => {
                    table = next;
                    level += 1;
                }
                Entry::Leaf(_) if level == target => {
                    // As in `unmap_level`: this entry belongs to this operation alone.
                    entry.store(0, Ordering::Release);
                    self.clean_entry(entry);
                    gather.add_leaf(ipa, size, level as u8);
                    return Some(size);
                }
                _ => return None,
            }
        }
    }

    fn unmap_level(
        &self,
        level: u32,
        table: u64,
        mut ipa: u64,
        mut size: u64,
        gather: &mut TlbGather,
        brk: Option<&dyn BreakSync>,
    ) -> Result<u64, MapError> {
        let span = level_size(level);
        let mut bytes = 0;
        while size > 0 {
            let chunk = (span - (ipa & (span - 1))).min(size);
            let whole = chunk == span;
            let entry = self.entry(table, self.index(level, ipa));
            let mut cur = entry.load(Ordering::Acquire);
            loop {
                match classify(cur, level) {
                    Entry::Empty => break,
                    Entry::Splitting(_) => cur = self.wait_split(entry),
                    Entry::Leaf(_) if whole => {
                        // A plain store: the contract gives this entry to this operation alone
                        // (any other operation that could change it overlaps our range), and no
                        // walker writes entries (no hardware access/dirty flag updates).
                        entry.store(0, Ordering::Release);
                        self.clean_entry(entry);
                        gather.add_leaf(ipa, span, level as u8);
                        bytes += span;
                        break;
                    }
                    Entry::Leaf(_) => {
                        cur = self.split(level, entry, cur, ipa & !(span - 1), gather, brk)?;
                    }
                    Entry::Table(next) if whole => {
                        if let Err(actual) =
                            entry.compare_exchange(cur, 0, Ordering::AcqRel, Ordering::Acquire)
                        {
                            cur = actual;
                            continue;
                        }
                        self.clean_entry(entry);
                        // Leaves below may be at several levels: no TTL hint.
                        gather.add_table(ipa, span, 0);
                        bytes += self.unlink_subtree(level + 1, next, gather);
                        break;
                    }
                    Entry::Table(next) => {
                        bytes += self.unmap_level(level + 1, next, ipa, chunk, gather, brk)?;
                        break;
                    }
                }
            }
            ipa += chunk;
            size -= chunk;
        }
        Ok(bytes)
    }

    /// Queues the unlinked table `table` at `level` and every table below it for freeing after the
    /// sync; returns the bytes it mapped. The tables stay intact until then: walkers may be in it.
    fn unlink_subtree(&self, level: u32, table: u64, gather: &mut TlbGather) -> u64 {
        let mut bytes = 0;
        for i in 0..TABLE_ENTRIES {
            match classify(self.entry(table, i).load(Ordering::Acquire), level) {
                Entry::Empty => {}
                Entry::Table(next) => bytes += self.unlink_subtree(level + 1, next, gather),
                Entry::Leaf(_) | Entry::Splitting(_) => bytes += level_size(level),
            }
        }
        gather.defer_free(table);
        bytes
    }

    // ---- protect ----

    /// Changes the permissions (write, exec) of every mapping in `[ipa, ipa + size)` to those of
    /// `attrs`, recording changed leaves in `gather`. The whole range must be mapped
    /// ([`MapError::NotMapped`]) with `attrs.mem` ([`MapError::MemTypeChange`]); on those errors
    /// nothing changes. Splits partly covered blocks whose permissions change.
    pub fn protect(
        &self,
        ipa: u64,
        size: u64,
        attrs: Attrs,
        gather: &mut TlbGather,
    ) -> Result<(), MapError> {
        self.protect_with(ipa, size, attrs, gather, None)
    }

    /// [`Stage2Table::protect`] with the hook that makes break-before-make splits visible.
    pub fn protect_with(
        &self,
        ipa: u64,
        size: u64,
        attrs: Attrs,
        gather: &mut TlbGather,
        brk: Option<&dyn BreakSync>,
    ) -> Result<(), MapError> {
        self.check_input(ipa, 0, size)?;
        let _op = self.begin(ipa, size);
        let end = ipa + size;
        let mut at = ipa;
        while at < end {
            match self.walk(at) {
                Walk::Hole { .. } => return Err(MapError::NotMapped { va: at }),
                Walk::Leaf { desc, level } => {
                    if Attrs::decode(desc, Regime::Stage2).mem != attrs.mem {
                        return Err(MapError::MemTypeChange { va: at });
                    }
                    at = (at | (level_size(level) - 1)) + 1;
                }
            }
        }
        let perm = attrs.encode(Regime::Stage2) & PERM_MASK;
        self.protect_level(self.start_level, self.root, ipa, size, perm, gather, brk)
    }

    #[allow(clippy::too_many_arguments)]
    fn protect_level(
        &self,
        level: u32,
        table: u64,
        mut ipa: u64,
        mut size: u64,
        perm: u64,
        gather: &mut TlbGather,
        brk: Option<&dyn BreakSync>,
    ) -> Result<(), MapError> {
        let span = level_size(level);
        while size > 0 {
            let chunk = (span - (ipa & (span - 1))).min(size);
            let whole = chunk == span;
            let entry = self.entry(table, self.index(level, ipa));
            let mut cur = entry.load(Ordering::Acquire);
            loop {
                match classify(cur, level) {
                    // Checked above: only an overlapping concurrent unmap gets here.
                    Entry::Empty => return Err(MapError::NotMapped { va: ipa }),
                    Entry::Splitting(_) => cur = self.wait_split(entry),
                    Entry::Leaf(desc) => {
                        let new = (desc & !PERM_MASK) | perm;
                        if new == desc {
                            break;
                        }
                        if !whole {
                            cur = self.split(level, entry, cur, ipa & !(span - 1), gather, brk)?;
                            continue;
                        }
                        // A permission change needs no break-before-make.
                        match entry.compare_exchange(cur, new, Ordering::AcqRel, Ordering::Acquire)
                        {
                            Ok(_) => {
                                self.clean_entry(entry);
                                gather.add_leaf(ipa, span, level as u8);
                                break;
                            }
                            Err(actual) => cur = actual,
                        }
                    }
                    Entry::Table(next) => {
                        self.protect_level(level + 1, next, ipa, chunk, perm, gather, brk)?;
                        break;
                    }
                }
            }
            ipa += chunk;
            size -= chunk;
        }
        Ok(())
    }

    // ---- freeing ----

    /// Frees table pages a gather unlinked, once the gather's invalidation has been synced on
    /// every agent ([`Stage2::sync`] does this).
    pub fn free_deferred(&self, pages: Vec<u64>) {
        for pa in pages {
            self.alloc.free_page(pa);
        }
    }

    /// Number of table pages reachable from the root, the root's pages included. A snapshot: exact
    /// only while no operation is in flight.
    pub fn table_pages(&self) -> usize {
        self.root_pages + self.count_below(self.start_level, self.root, self.root_entries)
    }

    fn count_below(&self, level: u32, table: u64, entries: usize) -> usize {
        (0..entries)
            .map(
                |i| match classify(self.entry(table, i).load(Ordering::Acquire), level) {
                    Entry::Table(next) => 1 + self.count_below(level + 1, next, TABLE_ENTRIES),
                    _ => 0,
                },
            )
            .sum()
    }

    fn free_below(&self, level: u32, table: u64, entries: usize) {
        for i in 0..entries {
            if let Entry::Table(next) =
                classify(self.entry(table, i).load(Ordering::Acquire), level)
            {
                self.free_below(level + 1, next, TABLE_ENTRIES);
                self.alloc.free_page(next);
            }
        }
    }
}

impl<A: PageAllocator, W: WalkerSync> Drop for Stage2Table<A, W> {
    /// Frees every table page. The VM must no longer run and its TLB entries must be gone.
    fn drop(&mut self) {
        self.free_below(self.start_level, self.root, self.root_entries);
        self.alloc.free_pages(self.root, self.root_pages);
    }
}

/// A stage-2 operation failed: in the table or in TLB maintenance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stage2Error {
    Map(MapError),
    Tlb(TlbError),
}

impl From<MapError> for Stage2Error {
    fn from(e: MapError) -> Self {
        Stage2Error::Map(e)
    }
}

impl From<TlbError> for Stage2Error {
    fn from(e: TlbError) -> Self {
        Stage2Error::Tlb(e)
    }
}

impl fmt::Display for Stage2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stage2Error::Map(e) => write!(f, "stage 2: {e}"),
            Stage2Error::Tlb(e) => write!(f, "stage-2 TLB maintenance: {e}"),
        }
    }
}

/// A VM's stage 2: its table, its VMID and every agent that walks the table (the CPUs, each SMMU
/// the VM's devices sit behind).
pub struct Stage2<A: PageAllocator, W: WalkerSync> {
    pub table: Stage2Table<A, W>,
    pub vmid: u16,
    agents: Vec<Arc<dyn TlbBackend>>,
}

/// Invalidates `inv` on every agent, then waits for every agent; the first error wins.
fn invalidate_all(
    agents: &[Arc<dyn TlbBackend>],
    vmid: u16,
    inv: &Invalidation,
) -> Result<(), TlbError> {
    for agent in agents {
        agent.invalidate(inv);
    }
    let mut result = Ok(());
    for agent in agents {
        if let Err(e) = agent.sync(vmid) {
            result = result.and(Err(e));
        }
    }
    result
}

/// The break-before-make hook of one `Stage2` operation: invalidates at once, remembers failures.
struct BreakNow<'a> {
    agents: &'a [Arc<dyn TlbBackend>],
    vmid: u16,
    error: Cell<Option<TlbError>>,
}

impl BreakSync for BreakNow<'_> {
    fn break_sync(&self, ipa: u64, size: u64, level: u32) {
        let mut gather = TlbGather::new();
        gather.add_leaf(ipa, size, level as u8);
        let inv = gather.invalidation(self.vmid);
        if let Err(e) = invalidate_all(self.agents, self.vmid, &inv) {
            let first = self.error.take().unwrap_or(e);
            self.error.set(Some(first));
        }
    }
}

impl<A: PageAllocator, W: WalkerSync> Stage2<A, W> {
    pub fn new(table: Stage2Table<A, W>, vmid: u16, agents: Vec<Arc<dyn TlbBackend>>) -> Self {
        Self {
            table,
            vmid,
            agents,
        }
    }

    /// Adds an agent that walks this table. Only before the VM runs.
    pub fn add_agent(&mut self, agent: Arc<dyn TlbBackend>) {
        self.agents.push(agent);
    }

    /// The agents that walk this table.
    pub fn agents(&self) -> &[Arc<dyn TlbBackend>] {
        &self.agents
    }

    /// Invalidates what `gather` recorded on every agent, waits for all of them, then frees the
    /// table pages the gather unlinked. An empty gather does nothing. On a TLB error nothing is
    /// freed and the gather keeps its contents (the pages are leaked rather than risk a walker
    /// using them).
    pub fn sync(&self, gather: &mut TlbGather) -> Result<(), TlbError> {
        if gather.is_empty() {
            return Ok(());
        }
        if self.agents.is_empty() && !gather.has_freed() {
            // No walker caches this table yet (a VM being built) and nothing to free.
            gather.reset();
            return Ok(());
        }
        let inv = gather.invalidation(self.vmid);
        invalidate_all(&self.agents, self.vmid, &inv)?;
        self.table.free_deferred(gather.take_freed());
        Ok(())
    }

    fn break_hook(&self) -> BreakNow<'_> {
        BreakNow {
            agents: &self.agents,
            vmid: self.vmid,
            error: Cell::new(None),
        }
    }

    /// [`Stage2Table::unmap`], with break-before-make splits invalidated on the agents at once.
    pub fn unmap(&self, ipa: u64, size: u64, gather: &mut TlbGather) -> Result<u64, Stage2Error> {
        let hook = self.break_hook();
        let bytes = self.table.unmap_with(ipa, size, gather, Some(&hook))?;
        match hook.error.take() {
            Some(e) => Err(e.into()),
            None => Ok(bytes),
        }
    }

    /// [`Stage2Table::protect`], with break-before-make splits invalidated on the agents at once.
    pub fn protect(
        &self,
        ipa: u64,
        size: u64,
        attrs: Attrs,
        gather: &mut TlbGather,
    ) -> Result<(), Stage2Error> {
        let hook = self.break_hook();
        self.table
            .protect_with(ipa, size, attrs, gather, Some(&hook))?;
        match hook.error.take() {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Unmaps and syncs. What was changed is synced even when the unmap failed halfway.
    pub fn unmap_sync(&self, ipa: u64, size: u64) -> Result<u64, Stage2Error> {
        let mut gather = TlbGather::new();
        let result = self.unmap(ipa, size, &mut gather);
        let synced = self.sync(&mut gather);
        let bytes = result?;
        synced?;
        Ok(bytes)
    }

    /// Changes permissions and syncs. What was changed is synced even when protect failed halfway.
    pub fn protect_sync(&self, ipa: u64, size: u64, attrs: Attrs) -> Result<(), Stage2Error> {
        let mut gather = TlbGather::new();
        let result = self.protect(ipa, size, attrs, &mut gather);
        let synced = self.sync(&mut gather);
        result?;
        synced?;
        Ok(())
    }
}

/// The debug-build registry of operations in flight (see the module docs). Its spin lock exists
/// only in debug builds.
#[cfg(all(debug_assertions, not(loom)))]
pub(crate) mod in_flight {
    use alloc::vec::Vec;

    pub(crate) struct InFlight {
        ranges: spin::Mutex<Vec<(u64, u64)>>,
    }

    /// Removes its range from the registry when the operation ends.
    pub(crate) struct Guard<'a> {
        set: &'a InFlight,
        range: (u64, u64),
    }

    impl InFlight {
        pub(crate) fn new() -> Self {
            Self {
                ranges: spin::Mutex::new(Vec::new()),
            }
        }

        pub(crate) fn enter(&self, start: u64, end: u64) -> Guard<'_> {
            let mut ranges = self.ranges.lock();
            let clash = ranges.iter().copied().find(|&(s, e)| s < end && start < e);
            if clash.is_none() {
                ranges.push((start, end));
            }
            drop(ranges);
            if let Some((s, e)) = clash {
                panic!(
                    "overlapping concurrent stage-2 operations: [{start:#x}, {end:#x}) while \
                     [{s:#x}, {e:#x}) is in flight"
                );
            }
            Guard {
                set: self,
                range: (start, end),
            }
        }
    }

    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            let mut ranges = self.set.ranges.lock();
            if let Some(i) = ranges.iter().position(|&r| r == self.range) {
                ranges.swap_remove(i);
            }
        }
    }
}
