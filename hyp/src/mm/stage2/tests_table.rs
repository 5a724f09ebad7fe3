//! Host tests of the stage-2 table: geometry, block selection, errors, splits, non-coherent
//! walkers, `Stage2` syncs, a property test against a reference model, and multi-threaded stress.

use std::boxed::Box;
use std::collections::BTreeMap;
use std::format;
use std::string::{String, ToString};
use std::sync::{Arc, Barrier, Mutex};
use std::vec::Vec;
use std::{thread, vec};

use proptest::prelude::*;

use super::pool::PagePool;
use super::sync::{AtomicU64, Ordering};
use super::table::*;
use super::tests_alloc::TestAlloc;
use super::tlb::{Invalidation, TlbBackend, TlbError, TlbGather};
use crate::mm::pgtable::{Attrs, MapError, MemType};

const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn cfg(ipa_bits: u32, split: SplitPolicy) -> Stage2Config {
    Stage2Config {
        ipa_bits,
        split,
        coherent_walk: true,
    }
}

fn table(alloc: &TestAlloc, split: SplitPolicy) -> Stage2Table<&TestAlloc, ()> {
    Stage2Table::new(cfg(40, split), alloc, ()).unwrap()
}

/// The descriptor a hardware walker would find for `ipa`, and its level (reads memory directly).
fn raw_walk(alloc: &TestAlloc, root: u64, start_level: u32, ipa_bits: u32, ipa: u64) -> (u64, u32) {
    let mut table = root;
    let mut level = start_level;
    loop {
        let shift = 12 + 9 * (3 - level);
        let entries = if level == start_level {
            1u64 << (ipa_bits - shift)
        } else {
            512
        };
        let index = ((ipa >> shift) & (entries - 1)) as usize;
        // SAFETY: `table` is a live table page of the tree (checked by the allocator).
        let desc = unsafe { &*alloc.table(table).add(index) }.load(Ordering::Acquire);
        if desc & 1 == 0 || level == 3 || desc & 2 == 0 {
            return (desc, level);
        }
        table = desc & 0x0000_ffff_ffff_f000;
        level += 1;
    }
}

#[test]
fn geometry_for_every_ipa_size() {
    let expected: &[(u32, u32, usize)] = &[
        (32, 2, 4),
        (33, 2, 8),
        (34, 2, 16),
        (35, 1, 1),
        (36, 1, 1),
        (37, 1, 1),
        (38, 1, 1),
        (39, 1, 1),
        (40, 1, 2),
        (41, 1, 4),
        (42, 1, 8),
        (43, 1, 16),
        (44, 0, 1),
        (45, 0, 1),
        (46, 0, 1),
        (47, 0, 1),
        (48, 0, 1),
    ];
    for &(bits, level, tables) in expected {
        assert_eq!(stage2_geometry(bits), Some((level, tables)), "{bits} bits");
        let alloc = TestAlloc::new(64);
        let t = Stage2Table::new(cfg(bits, SplitPolicy::Direct), &alloc, ()).unwrap();
        assert_eq!((t.start_level(), t.concatenated_tables()), (level, tables));
        assert_eq!(t.ipa_bits(), bits);
        assert_eq!(alloc.outstanding(), tables, "root is {tables} pages");
        assert_eq!(
            t.root_pa() % (tables as u64 * PAGE),
            0,
            "root naturally aligned"
        );
        // The first and the last page of the IPA space land in distinct, working entries.
        let top = (1u64 << bits) - PAGE;
        t.map(0, 0x1000_0000, PAGE, Attrs::RW).unwrap();
        t.map(top, 0x2000_0000, PAGE, Attrs::RO).unwrap();
        assert_eq!(t.translate(0x10), Some((0x1000_0010, Attrs::RW, 3)));
        assert_eq!(t.translate(top + 8), Some((0x2000_0008, Attrs::RO, 3)));
        assert_eq!(t.translate(top - PAGE), None);
        assert_eq!(t.translate(1u64 << bits), None);
        // The root entry of the top page is the last one of the (concatenated) root.
        let root_entries = tables as u64 * 512;
        let (desc, _) = raw_walk(&alloc, t.root_pa(), level, bits, top);
        assert_eq!(desc & !0xfff & 0x0000_ffff_ffff_f000, 0x2000_0000);
        if bits - (12 + 9 * (3 - level)) == 9 + tables.trailing_zeros() {
            // SAFETY: the root is live and has `root_entries` entries.
            let last = unsafe { &*alloc.table(t.root_pa()).add(root_entries as usize - 1) };
            assert_ne!(
                last.load(Ordering::Relaxed),
                0,
                "{bits}: last root entry used"
            );
        }
        drop(t);
        assert_eq!(alloc.outstanding(), 0);
    }
    assert_eq!(stage2_geometry(31), None);
    assert_eq!(stage2_geometry(49), None);
    let alloc = TestAlloc::new(4);
    assert!(matches!(
        Stage2Table::new(cfg(49, SplitPolicy::Direct), &alloc, ()),
        Err(MapError::UnsupportedInputSize { bits: 49 })
    ));
}

#[test]
fn largest_blocks_are_used() {
    let alloc = TestAlloc::new(64);
    let t = table(&alloc, SplitPolicy::Direct);
    t.map(GIB, 0x1_0000_0000, GIB, Attrs::RWX).unwrap();
    assert_eq!(
        t.translate(GIB + 0x1234),
        Some((0x1_0000_1234, Attrs::RWX, 1))
    );
    // 64 MiB at 2 MiB alignment: level-2 blocks.
    t.map(0x8000_0000, 0x5000_0000, 64 * MIB, Attrs::RW)
        .unwrap();
    assert_eq!(t.translate(0x8000_0000).unwrap().2, 2);
    assert_eq!(t.translate(0x83ff_fff8), Some((0x53ff_fff8, Attrs::RW, 2)));
    // PA misaligned relative to the IPA: pages.
    t.map(0x9000_0000, 0x6000_1000, 2 * MIB, Attrs::RO).unwrap();
    assert_eq!(t.translate(0x901f_f008), Some((0x6020_0008, Attrs::RO, 3)));
    // Head and tail pages around a block.
    t.map(0xa01f_f000, 0x701f_f000, 2 * MIB + 2 * PAGE, Attrs::DEVICE)
        .unwrap();
    assert_eq!(t.translate(0xa01f_f000).unwrap().2, 3);
    assert_eq!(t.translate(0xa020_0000).unwrap().2, 2);
    assert_eq!(
        t.translate(0xa040_0fff),
        Some((0x7040_0fff, Attrs::DEVICE, 3))
    );
    assert_eq!(t.translate(0xa040_1000), None);
    // A 1 GiB-aligned range of 1 GiB + 2 MiB: one level-1 block and one level-2 block.
    t.map(4 * GIB, 8 * GIB, GIB + 2 * MIB, Attrs::RW).unwrap();
    assert_eq!(t.translate(4 * GIB).unwrap().2, 1);
    assert_eq!(t.translate(5 * GIB).unwrap(), (9 * GIB, Attrs::RW, 2));
    drop(t);
    assert_eq!(alloc.outstanding(), 0);
}

#[test]
fn no_live_splits_maps_pages_only() {
    let alloc = TestAlloc::new(64);
    let t = table(&alloc, SplitPolicy::NoLiveSplits);
    t.map(GIB, GIB, 4 * MIB, Attrs::RW).unwrap();
    assert_eq!(
        t.translate(GIB + 2 * MIB),
        Some((GIB + 2 * MIB, Attrs::RW, 3))
    );
    let mut g = TlbGather::new();
    assert_eq!(t.unmap(GIB + PAGE, PAGE, &mut g), Ok(PAGE));
    t.protect(GIB + 2 * MIB, PAGE, Attrs::RO, &mut g).unwrap();
    assert_eq!(t.translate(GIB + 2 * MIB).unwrap().1, Attrs::RO);
    assert_eq!(t.translate(GIB + 2 * MIB + PAGE).unwrap().1, Attrs::RW);
}

#[test]
fn errors_leave_the_table_unchanged() {
    let alloc = TestAlloc::new(64);
    let t = table(&alloc, SplitPolicy::Direct);
    t.map(0x4000_0000 + 4 * MIB, 0x1000_0000, PAGE, Attrs::RW)
        .unwrap();
    let pages = alloc.outstanding();
    assert_eq!(
        t.map(0x4000_0000, 0x2000_0000, 8 * MIB, Attrs::RW),
        Err(MapError::AlreadyMapped { va: 0x4040_0000 })
    );
    assert_eq!(t.translate(0x4000_0000), None);
    assert_eq!(alloc.outstanding(), pages, "no table was left behind");
    // Inside a block.
    t.map(0x8000_0000, 0x8000_0000, 2 * MIB, Attrs::RW).unwrap();
    assert_eq!(
        t.map(0x8000_1000, 0, PAGE, Attrs::RW),
        Err(MapError::AlreadyMapped { va: 0x8000_1000 })
    );
    assert!(matches!(
        t.map(0x1001, 0, PAGE, Attrs::RW),
        Err(MapError::Unaligned { .. })
    ));
    assert!(matches!(
        t.map(0x1000, 0x800, PAGE, Attrs::RW),
        Err(MapError::Unaligned { .. })
    ));
    assert!(matches!(
        t.map(0, 0, 0, Attrs::RW),
        Err(MapError::Unaligned { .. })
    ));
    assert!(matches!(
        t.map(0xff_ffff_f000, 0, 2 * PAGE, Attrs::RW),
        Err(MapError::OutOfRange { .. })
    ));
    assert!(matches!(
        t.map(0, 0xffff_ffff_f000, 2 * PAGE, Attrs::RW),
        Err(MapError::OutputOutOfRange { .. })
    ));
    let mut g = TlbGather::new();
    assert!(matches!(
        t.unmap(1 << 40, PAGE, &mut g),
        Err(MapError::OutOfRange { .. })
    ));
    assert!(matches!(
        t.unmap(0x10, PAGE, &mut g),
        Err(MapError::Unaligned { .. })
    ));
    // Protect refuses holes and type changes before changing anything.
    assert_eq!(
        t.protect(0x8000_0000, 2 * MIB + PAGE, Attrs::RO, &mut g),
        Err(MapError::NotMapped { va: 0x8020_0000 })
    );
    assert_eq!(
        t.protect(0x8000_0000, PAGE, Attrs::DEVICE, &mut g),
        Err(MapError::MemTypeChange { va: 0x8000_0000 })
    );
    assert!(g.is_empty());
    assert_eq!(t.translate(0x8000_0000), Some((0x8000_0000, Attrs::RW, 2)));
    assert_eq!(alloc.outstanding(), pages + 1);
}

#[test]
fn out_of_memory_is_reported_and_recoverable() {
    // Root (2 pages) + one level-2 table, no room for a level-3 table.
    let alloc = TestAlloc::new(3);
    let t = table(&alloc, SplitPolicy::Direct);
    // The block part fits, the page part needs a level-3 table.
    assert_eq!(
        t.map(0x4000_0000, 0x4000_0000, 2 * MIB + PAGE, Attrs::RW),
        Err(MapError::NoMemory)
    );
    // Partly mapped: the caller undoes it with an unmap (and a sync).
    let mut g = TlbGather::new();
    assert_eq!(t.unmap(0x4000_0000, 2 * MIB + PAGE, &mut g), Ok(2 * MIB));
    assert_eq!(t.translate(0x4000_0000), None);
    // A split needs memory too.
    t.map(0x4000_0000, 0x4000_0000, 2 * MIB, Attrs::RW).unwrap();
    assert_eq!(t.unmap(0x4000_0000, PAGE, &mut g), Err(MapError::NoMemory));
    assert_eq!(t.translate(0x4000_0000).unwrap().2, 2, "block intact");
    drop(t);
    assert_eq!(alloc.outstanding(), 0);
}

#[test]
fn partial_unmap_splits_blocks() {
    for split in [SplitPolicy::Direct, SplitPolicy::BreakBeforeMake] {
        let alloc = TestAlloc::new(64);
        let t = table(&alloc, split);
        t.map(GIB, 0x1_0000_0000, GIB, Attrs::RWX).unwrap();
        let before = t.table_pages();
        let mut g = TlbGather::new();
        // One page in the middle of the 1 GiB block: split to 2 MiB blocks, then to pages.
        assert_eq!(t.unmap(GIB + 3 * MIB, PAGE, &mut g), Ok(PAGE));
        assert_eq!(t.table_pages(), before + 2);
        let inv = g.invalidation(1);
        assert!(!inv.leaf_only, "a split is a non-leaf change");
        assert_eq!(inv.range, None, "a 1 GiB range is a full flush");
        assert!(g.take_freed().is_empty());
        assert_eq!(t.translate(GIB + 3 * MIB), None);
        assert_eq!(
            t.translate(GIB + 3 * MIB + PAGE),
            Some((0x1_0030_1000, Attrs::RWX, 3))
        );
        assert_eq!(
            t.translate(GIB + 2 * MIB),
            Some((0x1_0020_0000, Attrs::RWX, 3))
        );
        assert_eq!(t.translate(GIB), Some((0x1_0000_0000, Attrs::RWX, 2)));
        assert_eq!(
            t.translate(2 * GIB - 1),
            Some((0x1_3fff_ffff, Attrs::RWX, 2))
        );
        // Unmapping the split 2 MiB region whole unlinks its level-3 table into the gather.
        assert_eq!(t.unmap(GIB + 2 * MIB, 2 * MIB, &mut g), Ok(2 * MIB - PAGE));
        let inv = g.invalidation(1);
        assert_eq!(inv.range, Some((GIB + 2 * MIB, GIB + 4 * MIB)));
        assert!(!inv.leaf_only);
        assert_eq!(inv.level, 0, "no TTL hint when a table is removed");
        let freed = g.take_freed();
        assert_eq!(freed.len(), 1);
        assert!(!alloc.is_freed(freed[0]), "not freed before the sync");
        t.free_deferred(freed.clone());
        assert!(alloc.is_freed(freed[0]));
        assert_eq!(t.table_pages(), before + 1);
        // A leaf unmap is leaf-only with its level as TTL hint.
        assert_eq!(t.unmap(GIB + 8 * MIB, 2 * MIB, &mut g), Ok(2 * MIB));
        let inv = g.invalidation(1);
        assert!(inv.leaf_only);
        assert_eq!(inv.level, 2);
        g.take_freed();
        // The tables that became partly empty stay; unmapping the whole 1 GiB frees them.
        assert_eq!(t.unmap(GIB, GIB, &mut g), Ok(GIB - 4 * MIB));
        t.free_deferred(g.take_freed());
        assert_eq!(t.table_pages(), 2);
        // Holes count nothing.
        assert_eq!(t.unmap(GIB, GIB, &mut g), Ok(0));
        assert!(g.is_empty());
        drop(t);
        assert_eq!(alloc.outstanding(), 0);
    }
}

#[test]
fn protect_changes_permissions_and_splits_only_when_needed() {
    let alloc = TestAlloc::new(64);
    let t = table(&alloc, SplitPolicy::Direct);
    t.map(0x4000_0000, 0x4000_0000, 4 * MIB, Attrs::RWX)
        .unwrap();
    let before = t.table_pages();
    let mut g = TlbGather::new();
    // Same permissions: nothing to do, no split.
    t.protect(0x4000_1000, PAGE, Attrs::RWX, &mut g).unwrap();
    assert!(g.is_empty());
    assert_eq!(t.table_pages(), before);
    // A whole block: changed in place.
    t.protect(0x4000_0000, 2 * MIB, Attrs::RX, &mut g).unwrap();
    assert_eq!(t.translate(0x4000_0000), Some((0x4000_0000, Attrs::RX, 2)));
    let inv = g.invalidation(1);
    assert!(inv.leaf_only);
    assert_eq!(inv.range, Some((0x4000_0000, 0x4020_0000)));
    g.take_freed();
    // Part of a block: split, then the page changes.
    t.protect(0x4020_2000, PAGE, Attrs::RO, &mut g).unwrap();
    assert_eq!(t.table_pages(), before + 1);
    assert_eq!(t.translate(0x4020_2000), Some((0x4020_2000, Attrs::RO, 3)));
    assert_eq!(t.translate(0x4020_3000), Some((0x4020_3000, Attrs::RWX, 3)));
    assert!(!g.invalidation(1).leaf_only);
}

#[test]
fn no_live_splits_refuses_to_split_a_block() {
    // Such a table never maps blocks itself; plant one as if it had been built elsewhere.
    let alloc = TestAlloc::new(64);
    let t = table(&alloc, SplitPolicy::NoLiveSplits);
    t.map(0x4020_0000, 0x4020_0000, PAGE, Attrs::RW).unwrap();
    let level2 = raw_walk_levels(&alloc, &t, 0x4020_0000).1[0];
    let block = 0x4000_0000 | Attrs::RW.encode(crate::mm::pgtable::Regime::Stage2) | 1;
    // SAFETY: a live level-2 table of the tree; entry 0 maps IPA 0x4000_0000.
    unsafe { &*alloc.table(level2) }.store(block, Ordering::Release);
    assert_eq!(t.translate(0x4000_1000), Some((0x4000_1000, Attrs::RW, 2)));
    let mut g = TlbGather::new();
    let refused = Err(MapError::WouldSplit { va: 0x4000_0000 });
    assert_eq!(t.unmap(0x4000_1000, PAGE, &mut g), refused.map(|()| 0));
    assert_eq!(t.protect(0x4000_1000, PAGE, Attrs::RO, &mut g), refused);
    assert!(g.is_empty());
    assert_eq!(t.unmap(0x4000_0000, 2 * MIB, &mut g), Ok(2 * MIB));
}

/// Records the walker hooks in order.
#[derive(Default)]
struct RecordingWalker {
    events: Mutex<Vec<(&'static str, u64, usize)>>,
}

impl WalkerSync for &RecordingWalker {
    fn publish_barrier(&self) {
        self.events.lock().unwrap().push(("barrier", 0, 0));
    }
    fn clean(&self, addr: *const AtomicU64, len: usize) {
        self.events
            .lock()
            .unwrap()
            .push(("clean", addr as u64, len));
    }
}

#[test]
fn non_coherent_walkers_get_cleans_and_barriers() {
    let alloc = TestAlloc::new(64);
    let walker = RecordingWalker::default();
    let config = Stage2Config {
        ipa_bits: 40,
        split: SplitPolicy::Direct,
        coherent_walk: false,
    };
    let t = Stage2Table::new(config, &alloc, &walker).unwrap();
    let root = alloc.table(t.root_pa()) as u64;
    assert_eq!(
        walker.events.lock().unwrap().as_slice(),
        &[("clean", root, 2 * 4096), ("barrier", 0, 0)]
    );
    walker.events.lock().unwrap().clear();
    t.map(0x4000_0000, 0x4000_0000, PAGE, Attrs::RW).unwrap();
    let events = walker.events.lock().unwrap().clone();
    // Level-2 table, level-3 table, page.
    let (_, l2, _) = raw_walk_levels(&alloc, &t, 0x4000_0000);
    let root_entry = root + 8;
    let l2_page = alloc.table(l2[0]) as u64;
    let l3_page = alloc.table(l2[1]) as u64;
    let expected = vec![
        ("clean", l2_page, 4096),
        ("barrier", 0, 0),
        ("clean", root_entry, 8),
        ("clean", l3_page, 4096),
        ("barrier", 0, 0),
        ("clean", l2_page, 8),
        ("clean", l3_page, 8),
        ("barrier", 0, 0),
    ];
    assert_eq!(events, expected);
    // Unmap cleans the cleared entry; coherent tables never clean.
    walker.events.lock().unwrap().clear();
    let mut g = TlbGather::new();
    t.unmap(0x4000_0000, PAGE, &mut g).unwrap();
    assert_eq!(
        walker.events.lock().unwrap().as_slice(),
        &[("clean", l3_page, 8)]
    );
    let coherent = Stage2Table::new(cfg(40, SplitPolicy::Direct), &alloc, &walker).unwrap();
    walker.events.lock().unwrap().clear();
    coherent.map(0, 0, 2 * MIB + PAGE, Attrs::RW).unwrap();
    assert!(
        walker
            .events
            .lock()
            .unwrap()
            .iter()
            .all(|e| e.0 == "barrier")
    );
}

/// The table pages on the walk to `ipa` below the root, and the leaf level.
fn raw_walk_levels<W: WalkerSync>(
    alloc: &TestAlloc,
    t: &Stage2Table<&TestAlloc, W>,
    ipa: u64,
) -> (u64, Vec<u64>, u32) {
    let mut tables = Vec::new();
    let mut table = t.root_pa();
    let mut level = t.start_level();
    loop {
        let shift = 12 + 9 * (3 - level);
        let mask = if level == t.start_level() {
            (1u64 << (t.ipa_bits() - shift)) - 1
        } else {
            511
        };
        // SAFETY: a live table of the tree.
        let desc = unsafe { &*alloc.table(table).add(((ipa >> shift) & mask) as usize) }
            .load(Ordering::Acquire);
        if desc & 1 == 0 || level == 3 || desc & 2 == 0 {
            return (desc, tables, level);
        }
        table = desc & 0x0000_ffff_ffff_f000;
        tables.push(table);
        level += 1;
    }
}

/// A TLB agent that records what it was asked, and optionally what memory held for an IPA at the
/// time of each invalidation.
struct RecordingAgent {
    name: &'static str,
    log: Arc<Mutex<Vec<String>>>,
    fail_sync: bool,
    probe: Option<Box<dyn Fn() -> u64 + Send + Sync>>,
}

impl TlbBackend for RecordingAgent {
    fn invalidate(&self, inv: &Invalidation) {
        let probe = self.probe.as_ref().map(|p| p()).unwrap_or(0);
        self.log.lock().unwrap().push(format!(
            "{} inv {:?} leaf={} level={} probe={probe:#x}",
            self.name, inv.range, inv.leaf_only, inv.level
        ));
    }
    fn sync(&self, vmid: u16) -> Result<(), TlbError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("{} sync {vmid}", self.name));
        if self.fail_sync {
            Err(TlbError {
                agent: self.name,
                what: "timeout",
            })
        } else {
            Ok(())
        }
    }
    fn name(&self) -> &str {
        self.name
    }
}

fn agent(name: &'static str, log: &Arc<Mutex<Vec<String>>>) -> Arc<dyn TlbBackend> {
    Arc::new(RecordingAgent {
        name,
        log: log.clone(),
        fail_sync: false,
        probe: None,
    })
}

#[test]
fn stage2_sync_invalidates_everywhere_then_frees() {
    let alloc = TestAlloc::new(64);
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut s2 = Stage2::new(
        table(&alloc, SplitPolicy::Direct),
        7,
        vec![agent("cpu", &log)],
    );
    s2.add_agent(agent("smmu", &log));
    assert_eq!(s2.agents().len(), 2);
    let mut g = TlbGather::new();
    s2.sync(&mut g).unwrap();
    assert!(log.lock().unwrap().is_empty(), "an empty gather is a no-op");
    s2.table
        .map(0x4000_0000, 0, 2 * MIB + PAGE, Attrs::RW)
        .unwrap();
    let l3 = raw_walk_levels(&alloc, &s2.table, 0x4020_0000).1[1];
    assert_eq!(s2.unmap_sync(0x4020_0000, 2 * MIB), Ok(PAGE));
    assert!(alloc.is_freed(l3));
    assert_eq!(
        log.lock().unwrap().as_slice(),
        &[
            "cpu inv Some((1075838976, 1077936128)) leaf=false level=0 probe=0x0",
            "smmu inv Some((1075838976, 1077936128)) leaf=false level=0 probe=0x0",
            "cpu sync 7",
            "smmu sync 7",
        ]
    );
    log.lock().unwrap().clear();
    s2.protect_sync(0x4000_0000, 2 * MIB, Attrs::RO).unwrap();
    assert_eq!(log.lock().unwrap().len(), 4);
    // A failing agent: every agent is still synced, nothing is freed, the error is reported.
    let failing: Arc<dyn TlbBackend> = Arc::new(RecordingAgent {
        name: "bad",
        log: log.clone(),
        fail_sync: true,
        probe: None,
    });
    s2.add_agent(failing);
    s2.table.map(0x8000_0000, 0, PAGE, Attrs::RW).unwrap();
    let l3 = raw_walk_levels(&alloc, &s2.table, 0x8000_0000).1[1];
    let mut g = TlbGather::new();
    s2.unmap(0x8000_0000, 2 * MIB, &mut g).unwrap();
    log.lock().unwrap().clear();
    let err = s2.sync(&mut g).unwrap_err();
    assert_eq!(err.agent, "bad");
    assert_eq!(log.lock().unwrap().len(), 6);
    assert!(!alloc.is_freed(l3), "not freed after a failed sync");
    assert!(!g.is_empty(), "the gather keeps its contents for a retry");
    assert!(matches!(
        s2.unmap_sync(0x4000_0000, PAGE),
        Err(Stage2Error::Tlb(_))
    ));
    assert!(Stage2Error::from(err).to_string().contains("bad"));
}

#[test]
fn break_before_make_invalidates_the_break_before_the_make() {
    let alloc = Arc::new(TestAlloc::new(64));
    let log = Arc::new(Mutex::new(Vec::new()));
    let s2_table =
        Stage2Table::new(cfg(40, SplitPolicy::BreakBeforeMake), alloc.clone(), ()).unwrap();
    let (root, start) = (s2_table.root_pa(), s2_table.start_level());
    s2_table
        .map(0x4000_0000, 0x4000_0000, 2 * MIB, Attrs::RW)
        .unwrap();
    let probe_alloc = alloc.clone();
    let probe = move || raw_walk(&probe_alloc, root, start, 40, 0x4000_0000).0;
    let cpu: Arc<dyn TlbBackend> = Arc::new(RecordingAgent {
        name: "cpu",
        log: log.clone(),
        fail_sync: false,
        probe: Some(Box::new(probe)),
    });
    let s2 = Stage2::new(s2_table, 1, vec![cpu]);
    let mut g = TlbGather::new();
    assert_eq!(s2.unmap(0x4000_5000, PAGE, &mut g), Ok(PAGE));
    let log_now = log.lock().unwrap().clone();
    assert_eq!(log_now.len(), 2, "{log_now:?}");
    // During the break the walkers see an invalid entry (bit 0 clear) for the block.
    assert!(
        log_now[0].starts_with("cpu inv Some((1073741824, 1075838976)) leaf=true level=2 probe="),
        "{log_now:?}"
    );
    let probe_val = u64::from_str_radix(log_now[0].rsplit("0x").next().unwrap(), 16).unwrap();
    assert_eq!(probe_val & 1, 0, "block still valid during the break");
    assert_ne!(probe_val, 0);
    // After: a table; the gather holds only the page.
    let inv = g.invalidation(1);
    assert!(inv.leaf_only);
    assert_eq!(inv.range, Some((0x4000_5000, 0x4000_6000)));
    assert_eq!(
        s2.table.translate(0x4000_6000),
        Some((0x4000_6000, Attrs::RW, 3))
    );
    // A bare table with BreakBeforeMake and no hook records the split in the gather instead.
    let bare = Stage2Table::new(cfg(40, SplitPolicy::BreakBeforeMake), alloc.clone(), ()).unwrap();
    bare.map(0x4000_0000, 0x4000_0000, 2 * MIB, Attrs::RW)
        .unwrap();
    let mut g = TlbGather::new();
    bare.unmap(0x4000_5000, PAGE, &mut g).unwrap();
    let inv = g.invalidation(1);
    assert!(!inv.leaf_only);
    assert_eq!(inv.range, Some((0x4000_0000, 0x4020_0000)));
}

#[cfg(debug_assertions)]
#[test]
#[should_panic(expected = "overlapping concurrent stage-2 operations")]
fn overlapping_operations_panic_in_debug_builds() {
    let alloc = TestAlloc::new(64);
    let t = table(&alloc, SplitPolicy::Direct);
    let _other = t.begin_for_test(0x4000_0000, 2 * MIB);
    let _ = t.map(0x401f_f000, 0, 2 * PAGE, Attrs::RW);
}

#[cfg(debug_assertions)]
#[test]
fn disjoint_operations_in_flight_are_fine() {
    let alloc = TestAlloc::new(64);
    let t = table(&alloc, SplitPolicy::Direct);
    {
        let _other = t.begin_for_test(0x4000_0000, 2 * MIB);
        t.map(0x4020_0000, 0, PAGE, Attrs::RW).unwrap();
        t.map(0x3fff_f000, 0, PAGE, Attrs::RW).unwrap();
    }
    // The range is released when the operation ends.
    t.map(0x4000_0000, 0, PAGE, Attrs::RW).unwrap();
}

// ---- property test against a reference model ----

/// The window the property test works in: 8 MiB (four 2 MiB blocks) at 1 GiB.
const WIN_BASE: u64 = GIB;
const WIN_PAGES: u64 = 4 * 512;
const PA_BASE: u64 = 0x10_0000_0000;
const ATTRS: [Attrs; 5] = [Attrs::RW, Attrs::RO, Attrs::RX, Attrs::RWX, Attrs::DEVICE];

#[derive(Clone, Debug)]
enum Op {
    Map {
        page: u64,
        pages: u64,
        pa_page: u64,
        attrs: usize,
    },
    Unmap {
        page: u64,
        pages: u64,
    },
    Protect {
        page: u64,
        pages: u64,
        attrs: usize,
    },
}

/// A page range in the window: small, block shaped, or anything.
fn range() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        (0..WIN_PAGES, 1..=8u64),
        (
            (0..4u64).prop_map(|b| b * 512),
            prop_oneof![Just(512u64), Just(1024)]
        ),
        (0..WIN_PAGES, 1..=600u64),
    ]
    .prop_map(|(page, pages)| (page, pages.min(WIN_PAGES - page)))
}

fn op() -> impl Strategy<Value = Op> {
    let pa = prop_oneof![(0..64u64).prop_map(|b| b * 512), 0..(64 * 512u64)];
    prop_oneof![
        4 => (range(), pa, 0..ATTRS.len()).prop_map(|((page, pages), pa_page, attrs)| Op::Map {
            page,
            pages,
            pa_page,
            attrs
        }),
        3 => range().prop_map(|(page, pages)| Op::Unmap { page, pages }),
        2 => (range(), 0..ATTRS.len()).prop_map(|((page, pages), attrs)| Op::Protect {
            page,
            pages,
            attrs
        }),
    ]
}

type Model = BTreeMap<u64, (u64, Attrs)>;

fn check_pages(t: &Stage2Table<&TestAlloc, ()>, model: &Model, pages: impl Iterator<Item = u64>) {
    let pages_only = t.config().split == SplitPolicy::NoLiveSplits;
    for page in pages {
        let ipa = WIN_BASE + page * PAGE;
        let got = t.translate(ipa + 0x18);
        let want = model.get(&page).map(|&(pa, a)| (pa + 0x18, a));
        assert_eq!(got.map(|(pa, a, _)| (pa, a)), want, "page {page:#x}");
        if pages_only && let Some((_, _, level)) = got {
            assert_eq!(level, 3);
        }
    }
}

fn run_ops(split: SplitPolicy, ops: &[Op], probes: &[u64]) {
    let alloc = TestAlloc::new(1536);
    let t = Stage2Table::new(cfg(40, split), &alloc, ()).unwrap();
    let mut model = Model::new();
    for op in ops {
        let mut g = TlbGather::new();
        let (page, pages) = match *op {
            Op::Map {
                page,
                pages,
                pa_page,
                attrs,
            } => {
                let attrs = ATTRS[attrs];
                let want = match (page..page + pages).find(|p| model.contains_key(p)) {
                    Some(p) => Err(MapError::AlreadyMapped {
                        va: WIN_BASE + p * PAGE,
                    }),
                    None => {
                        for i in 0..pages {
                            model.insert(page + i, (PA_BASE + (pa_page + i) * PAGE, attrs));
                        }
                        Ok(())
                    }
                };
                let got = t.map(
                    WIN_BASE + page * PAGE,
                    PA_BASE + pa_page * PAGE,
                    pages * PAGE,
                    attrs,
                );
                assert_eq!(got, want, "{op:?}");
                (page, pages)
            }
            Op::Unmap { page, pages } => {
                let mapped = (page..page + pages)
                    .filter(|p| model.remove(p).is_some())
                    .count() as u64;
                let got = t.unmap(WIN_BASE + page * PAGE, pages * PAGE, &mut g);
                assert_eq!(got, Ok(mapped * PAGE), "{op:?}");
                // (An unmap may also unlink a table that had become empty.)
                assert!(mapped == 0 || !g.is_empty(), "{op:?}");
                (page, pages)
            }
            Op::Protect { page, pages, attrs } => {
                let attrs = ATTRS[attrs];
                let problem = (page..page + pages).find_map(|p| match model.get(&p) {
                    None => Some(MapError::NotMapped {
                        va: WIN_BASE + p * PAGE,
                    }),
                    Some(&(_, a)) if a.mem != attrs.mem => Some(MapError::MemTypeChange {
                        va: WIN_BASE + p * PAGE,
                    }),
                    _ => None,
                });
                let want = match problem {
                    Some(e) => Err(e),
                    None => {
                        for p in page..page + pages {
                            let entry = model.get_mut(&p).unwrap();
                            entry.1.write = attrs.write;
                            entry.1.exec = attrs.exec && attrs.mem == MemType::Normal;
                        }
                        Ok(())
                    }
                };
                let got = t.protect(WIN_BASE + page * PAGE, pages * PAGE, attrs, &mut g);
                assert_eq!(got, want, "{op:?}");
                if got.is_err() {
                    assert!(g.is_empty(), "a refused protect changed something");
                }
                (page, pages)
            }
        };
        t.free_deferred(g.take_freed());
        check_pages(&t, &model, page..page + pages);
        check_pages(&t, &model, probes.iter().copied());
    }
    check_pages(&t, &model, 0..WIN_PAGES);
    drop(t);
    assert_eq!(alloc.outstanding(), 0, "table pages leaked");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_operations_match_the_model(
        split in prop_oneof![
            Just(SplitPolicy::Direct),
            Just(SplitPolicy::BreakBeforeMake),
            Just(SplitPolicy::NoLiveSplits)
        ],
        ops in proptest::collection::vec(op(), 64),
        probes in proptest::collection::vec(0..WIN_PAGES, 4),
    ) {
        run_ops(split, &ops, &probes);
    }
}

// ---- multi-threaded stress ----

const THREADS: usize = 4;

/// Threads map, check, unmap and remap disjoint ranges that share intermediate tables: 2 MiB
/// slots under one level-2 table (as blocks or as pages, so level-3 tables come and go), and
/// interleaved pages of one shared level-3 table.
fn disjoint_ranges_stress<A: PageAllocator>(alloc: A, rounds: u64) {
    let t = Stage2Table::new(cfg(40, SplitPolicy::Direct), alloc, ()).unwrap();
    const SLOTS: u64 = 16;
    let shared = WIN_BASE + SLOTS * 2 * MIB;
    let pa_of =
        |t: u64, slot: u64, round: u64| PA_BASE + slot * 4 * MIB + (round % 2) * PAGE + t * GIB;
    thread::scope(|s| {
        for tid in 0..THREADS as u64 {
            let t = &t;
            s.spawn(move || {
                let slots: Vec<u64> = (0..SLOTS).filter(|s| s % THREADS as u64 == tid).collect();
                let my_pages: Vec<u64> = (0..512).filter(|p| p % THREADS as u64 == tid).collect();
                for round in 0..rounds {
                    let last = round + 1 == rounds;
                    let mut g = TlbGather::new();
                    for &slot in &slots {
                        let ipa = WIN_BASE + slot * 2 * MIB;
                        let pa = pa_of(tid, slot, round);
                        t.map(ipa, pa, 2 * MIB, Attrs::RW).unwrap();
                        let level = if round % 2 == 0 { 2 } else { 3 };
                        for probe in [0, 0x1000, 0x1f_f000] {
                            assert_eq!(
                                t.translate(ipa + probe),
                                Some((pa + probe, Attrs::RW, level))
                            );
                        }
                        if !last {
                            assert_eq!(t.unmap(ipa, 2 * MIB, &mut g), Ok(2 * MIB));
                        }
                    }
                    for &p in &my_pages {
                        let pa = PA_BASE + tid * GIB + (round * 512 + p) * PAGE;
                        t.map(shared + p * PAGE, pa, PAGE, Attrs::RO).unwrap();
                    }
                    for &p in &my_pages {
                        let pa = PA_BASE + tid * GIB + (round * 512 + p) * PAGE;
                        assert_eq!(t.translate(shared + p * PAGE), Some((pa, Attrs::RO, 3)));
                        if !last {
                            assert_eq!(t.unmap(shared + p * PAGE, PAGE, &mut g), Ok(PAGE));
                        }
                    }
                    t.free_deferred(g.take_freed());
                }
            });
        }
    });
    for slot in 0..SLOTS {
        let tid = slot % THREADS as u64;
        let pa = pa_of(tid, slot, rounds - 1);
        for page in 0..512 {
            let ipa = WIN_BASE + slot * 2 * MIB + page * PAGE;
            assert_eq!(t.translate(ipa).map(|x| x.0), Some(pa + page * PAGE));
        }
    }
    for p in 0..512 {
        let tid = p % THREADS as u64;
        let pa = PA_BASE + tid * GIB + ((rounds - 1) * 512 + p) * PAGE;
        assert_eq!(t.translate(shared + p * PAGE), Some((pa, Attrs::RO, 3)));
    }
    // Root, level 2, level 3 of every paged slot (the last round's parity) and the shared one.
    let paged = if (rounds - 1) % 2 == 1 {
        SLOTS as usize
    } else {
        0
    };
    assert_eq!(t.table_pages(), 2 + 1 + paged + 1);
}

#[test]
fn stress_disjoint_ranges_sharing_tables() {
    let alloc = TestAlloc::new(16384);
    disjoint_ranges_stress(&alloc, 40);
    assert_eq!(alloc.outstanding(), 0);
}

#[test]
fn stress_disjoint_ranges_through_the_page_pool() {
    let backing = TestAlloc::new(4096);
    let pool = PagePool::new(&backing, 32);
    disjoint_ranges_stress(&pool, 60);
    assert_eq!(backing.outstanding(), pool.pooled());
    drop(pool);
    assert_eq!(backing.outstanding(), 0);
}

/// Threads unmap distinct pages of one shared block at the same time: every page they unmapped is
/// gone, every other page still maps where it did, and exactly the split tables needed survive
/// (the losers' copies are freed at once).
fn split_race(split: SplitPolicy, block: u64, rounds: usize) {
    let alloc = TestAlloc::new(8192);
    let t = Stage2Table::new(cfg(40, split), &alloc, ()).unwrap();
    let base = GIB;
    let pa = 0x40_0000_0000;
    // Pages each thread unmaps: its own 2 MiB sub-block's pages (1 GiB case) and pages shared
    // with the other threads' sub-blocks.
    let pages_of = |tid: u64| -> Vec<u64> {
        let mut v: Vec<u64> = (0..8).map(|i| tid + i * THREADS as u64 * 7).collect();
        if block == GIB {
            v.extend((0..4).map(|i| (tid + 1) * 512 + i * 13));
        }
        v
    };
    let barrier = Barrier::new(THREADS + 1);
    thread::scope(|s| {
        for tid in 0..THREADS as u64 {
            let (t, barrier, pages) = (&t, &barrier, pages_of(tid));
            s.spawn(move || {
                for _ in 0..rounds {
                    barrier.wait();
                    let mut g = TlbGather::new();
                    for &p in &pages {
                        assert_eq!(t.unmap(base + p * PAGE, PAGE, &mut g), Ok(PAGE));
                    }
                    assert!(g.take_freed().is_empty());
                    barrier.wait();
                }
            });
        }
        let all: Vec<u64> = (0..THREADS as u64).flat_map(pages_of).collect();
        let sub_blocks = {
            let mut v: Vec<u64> = all.iter().map(|p| p / 512).collect();
            v.dedup();
            v.sort_unstable();
            v.dedup();
            v
        };
        for _ in 0..rounds {
            t.map(base, pa, block, Attrs::RWX).unwrap();
            let before = t.table_pages();
            let outstanding = alloc.outstanding();
            barrier.wait();
            barrier.wait();
            let new_tables = if block == GIB {
                1 + sub_blocks.len()
            } else {
                1
            };
            assert_eq!(t.table_pages(), before + new_tables);
            assert_eq!(
                alloc.outstanding(),
                outstanding + new_tables,
                "a losing copy leaked"
            );
            for &sb in &sub_blocks {
                for page in sb * 512..(sb + 1) * 512 {
                    let want = (!all.contains(&page)).then_some((pa + page * PAGE, Attrs::RWX, 3));
                    assert_eq!(t.translate(base + page * PAGE), want, "page {page}");
                }
            }
            if block == GIB {
                for sb in (0..512).filter(|sb| !sub_blocks.contains(sb)) {
                    let ipa = base + sb * 2 * MIB + PAGE;
                    assert_eq!(
                        t.translate(ipa),
                        Some((pa + sb * 2 * MIB + PAGE, Attrs::RWX, 2))
                    );
                }
            }
            let mut g = TlbGather::new();
            let expected = block - all.len() as u64 * PAGE;
            assert_eq!(t.unmap(base, block, &mut g), Ok(expected));
            t.free_deferred(g.take_freed());
        }
    });
    drop(t);
    assert_eq!(alloc.outstanding(), 0);
}

#[test]
fn stress_split_race_2m_block_direct() {
    split_race(SplitPolicy::Direct, 2 * MIB, 300);
}

#[test]
fn stress_split_race_1g_block_direct() {
    split_race(SplitPolicy::Direct, GIB, 40);
}

#[test]
fn stress_split_race_2m_block_break_before_make() {
    split_race(SplitPolicy::BreakBeforeMake, 2 * MIB, 300);
}
