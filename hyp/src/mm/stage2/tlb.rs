//! Batched, per-VM TLB maintenance for everything that walks a VM's stage-2 tables.
//!
//! Unmap and protect record what they changed in a [`TlbGather`]: the IPA range, whether only
//! leaf entries changed (so walk caches may be kept), the smallest level that changed (a hint for
//! range invalidation) and the table pages that were unlinked and must not be freed yet. One call
//! to `Stage2::sync` then invalidates that range in every agent that walks the VM's tables — the
//! CPUs (TLBI by IPA, then the combined stage-1+2 entries), each SMMU (SMMUv3 commands or SMMUv2
//! context-bank registers) — waits for all of them, and only then frees the unlinked pages.
//!
//! Everything is scoped by VMID: one VM's invalidation never waits for another VM's, and no global
//! lock is taken. A backend may serialise per VM where the hardware requires it (SMMUv2's
//! per-context-bank TLBSYNC/TLBSTATUS), never across VMs.

use alloc::vec::Vec;

/// Above this many pages a range invalidation becomes "everything for this VMID": one command
/// instead of thousands (Linux uses a similar cut-over for SMMUv3).
pub const FULL_FLUSH_PAGES: u64 = 512;

/// What one batch of stage-2 changes needs invalidated.
#[derive(Debug, Default)]
pub struct TlbGather {
    /// Start of the changed IPA range (inclusive); `u64::MAX` when empty.
    start: u64,
    /// End of the changed IPA range (exclusive).
    end: u64,
    /// True while only leaf entries (pages/blocks) changed; false once a table entry was
    /// removed or replaced, so walk caches must be invalidated too.
    leaf_only: bool,
    /// The smallest translation level (largest number, 1..=3) whose entries changed: a TTL hint.
    /// 0 when unknown or mixed.
    level: u8,
    /// Invalidate everything for the VMID instead of a range.
    full: bool,
    /// Table pages unlinked by this batch: freed only after the sync completed.
    freed: Vec<u64>,
}

/// The part of a gather a backend needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Invalidation {
    pub vmid: u16,
    /// `None`: everything for the VMID.
    pub range: Option<(u64, u64)>,
    pub leaf_only: bool,
    /// Level of the changed entries when all were at one level (TTL hint), else 0.
    pub level: u8,
}

impl TlbGather {
    pub fn new() -> Self {
        Self {
            start: u64::MAX,
            end: 0,
            leaf_only: true,
            level: 0,
            full: false,
            freed: Vec::new(),
        }
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        !self.full && self.start == u64::MAX && self.freed.is_empty()
    }

    fn add_range(&mut self, ipa: u64, size: u64, level: u8) {
        let first = self.start == u64::MAX;
        self.start = self.start.min(ipa);
        self.end = self.end.max(ipa + size);
        self.level = if first || self.level == level {
            level
        } else {
            0
        };
        if (self.end - self.start) / 4096 > FULL_FLUSH_PAGES {
            self.full = true;
        }
    }

    /// A leaf entry (page or block) at `level` mapping `[ipa, ipa + size)` changed.
    pub fn add_leaf(&mut self, ipa: u64, size: u64, level: u8) {
        self.add_range(ipa, size, level);
    }

    /// A table entry covering `[ipa, ipa + size)` was removed or replaced.
    pub fn add_table(&mut self, ipa: u64, size: u64, level: u8) {
        self.leaf_only = false;
        self.add_range(ipa, size, level);
    }

    /// A table page (physical address) was unlinked: free it after the sync.
    pub fn defer_free(&mut self, table_pa: u64) {
        self.freed.push(table_pa);
    }

    /// Ask for a full flush of the VMID (e.g. after a large change).
    pub fn add_full(&mut self) {
        self.full = true;
        self.leaf_only = false;
    }

    /// What to invalidate for `vmid`.
    pub fn invalidation(&self, vmid: u16) -> Invalidation {
        Invalidation {
            vmid,
            range: (!self.full && self.start != u64::MAX).then_some((self.start, self.end)),
            leaf_only: self.leaf_only && !self.full,
            level: self.level,
        }
    }

    /// True when the batch unlinked table pages that await the sync.
    pub fn has_freed(&self) -> bool {
        !self.freed.is_empty()
    }

    /// Forgets everything recorded (nothing was freed).
    pub fn reset(&mut self) {
        debug_assert!(
            self.freed.is_empty(),
            "resetting a gather that holds unlinked tables"
        );
        self.start = u64::MAX;
        self.end = 0;
        self.leaf_only = true;
        self.level = 0;
        self.full = false;
    }

    /// Empties the gather, handing out the pages that can now be freed. Only call after every
    /// agent's sync completed.
    pub fn take_freed(&mut self) -> Vec<u64> {
        let freed = core::mem::take(&mut self.freed);
        *self = Self::new();
        freed
    }
}

/// One range invalidation (CPU FEAT_TLBIRANGE `RIPAS2E1IS`, SMMUv3 `IDR3.RIL` range commands):
/// `(num + 1) << (5 * scale + 1)` pages from `ipa`, `num` in 0..=31, `scale` in 0..=3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RangeOp {
    pub ipa: u64,
    pub num: u64,
    pub scale: u64,
}

impl RangeOp {
    /// Pages this operation covers.
    pub fn pages(&self) -> u64 {
        (self.num + 1) << (5 * self.scale + 1)
    }
}

/// Splits `pages` 4 KiB pages from `ipa` into range operations. Each operation uses the smallest
/// scale whose 32 units cover what is left, so it over-covers by less than one unit (harmless: an
/// extra invalidation) and a range needs at most a few operations.
pub fn range_ops(ipa: u64, pages: u64) -> impl Iterator<Item = RangeOp> {
    let mut ipa = ipa;
    let mut left = pages;
    core::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let scale = (0..4u64)
            .find(|&s| left.div_ceil(1 << (5 * s + 1)) <= 32)
            .unwrap_or(3);
        let unit = 1u64 << (5 * scale + 1);
        let num = left.div_ceil(unit).clamp(1, 32);
        let op = RangeOp {
            ipa,
            num: num - 1,
            scale,
        };
        let covered = op.pages().min(left);
        ipa += covered * 4096;
        left -= covered;
        Some(op)
    })
}

/// An agent that caches translations from a VM's stage-2 tables: the CPUs, an SMMU.
///
/// `invalidate` may only queue the work; `sync` returns once every invalidation queued by this
/// caller for `vmid` has completed. Neither may take a lock shared between VMs.
pub trait TlbBackend: Send + Sync {
    /// Queues invalidation of what `inv` describes.
    fn invalidate(&self, inv: &Invalidation);
    /// Waits until the invalidations this caller queued for `vmid` are complete.
    fn sync(&self, vmid: u16) -> Result<(), TlbError>;
    /// For messages and counters.
    fn name(&self) -> &str;
}

/// A TLB maintenance failure (hardware did not complete in time).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlbError {
    pub agent: &'static str,
    pub what: &'static str,
}

impl core::fmt::Display for TlbError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}: {}", self.agent, self.what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_merges_ranges_and_levels() {
        let mut g = TlbGather::new();
        assert!(g.is_empty());
        assert_eq!(g.invalidation(3).range, None);
        g.add_leaf(0x8000_1000, 0x1000, 3);
        g.add_leaf(0x8000_5000, 0x1000, 3);
        let inv = g.invalidation(3);
        assert_eq!(inv.range, Some((0x8000_1000, 0x8000_6000)));
        assert!(inv.leaf_only);
        assert_eq!(inv.level, 3);
        g.add_leaf(0x8020_0000, 0x20_0000, 2);
        assert_eq!(g.invalidation(3).level, 0);
        g.add_table(0x8040_0000, 0x20_0000, 2);
        g.defer_free(0x1234_5000);
        let inv = g.invalidation(3);
        assert!(!inv.leaf_only);
        assert_eq!(g.take_freed(), vec![0x1234_5000]);
        assert!(g.is_empty());
    }

    #[test]
    fn range_ops_cover_exactly_with_little_waste() {
        for pages in [
            1u64,
            2,
            3,
            31,
            32,
            33,
            64,
            65,
            1000,
            1 << 16,
            (1 << 21) + 5,
            1 << 22,
        ] {
            let ops: Vec<_> = range_ops(0x4000_0000, pages).collect();
            let mut at = 0x4000_0000u64;
            let mut covered = 0;
            for op in &ops {
                assert_eq!(op.ipa, at, "operations are contiguous");
                assert!(op.num <= 31 && op.scale <= 3);
                at += op.pages() * 4096;
                covered += op.pages();
            }
            assert!(covered >= pages, "{pages}: covered {covered}");
            let last_unit = ops.last().map(|o| 1u64 << (5 * o.scale + 1)).unwrap();
            assert!(
                covered - pages < last_unit,
                "{pages}: waste {}",
                covered - pages
            );
            assert!(ops.len() <= 4, "{pages}: {} operations", ops.len());
        }
    }

    #[test]
    fn large_ranges_become_full_flushes() {
        let mut g = TlbGather::new();
        g.add_leaf(0, 0x4000_0000, 1);
        let inv = g.invalidation(1);
        assert_eq!(inv.range, None);
        assert!(!inv.leaf_only);
    }
}
