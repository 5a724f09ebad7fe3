//! Loom models of the stage-2 table's races (`RUSTFLAGS="--cfg loom" cargo test -p hyp --release
//! --lib loom`).
//!
//! Under loom a table has 4 entries (see `sync.rs`): with a 20-bit IPA the root is four
//! concatenated level-1 tables, a level-1 entry spans 64 KiB, a level-2 entry (block) 16 KiB and a
//! level-3 entry a 4 KiB page.

use loom::sync::Arc;
use loom::thread;

use super::table::{SplitPolicy, Stage2Config, Stage2Table, level_size};
use super::tests_alloc::TestAlloc;
use super::tlb::TlbGather;
use crate::mm::pgtable::Attrs;

const PAGE: u64 = 4096;
const IPA_BITS: u32 = 20;
const ROOT_PAGES: usize = 4;

type Table = Stage2Table<std::sync::Arc<TestAlloc>, ()>;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(f);
}

fn new_table(split: SplitPolicy) -> (std::sync::Arc<TestAlloc>, Arc<Table>) {
    let alloc = std::sync::Arc::new(TestAlloc::new(12));
    let config = Stage2Config {
        ipa_bits: IPA_BITS,
        split,
        coherent_walk: true,
    };
    let table = Stage2Table::new(config, alloc.clone(), ()).unwrap();
    assert_eq!(
        (table.start_level(), table.concatenated_tables()),
        (1, ROOT_PAGES)
    );
    (alloc, Arc::new(table))
}

fn finish(alloc: std::sync::Arc<TestAlloc>, table: Arc<Table>) {
    drop(table);
    assert_eq!(alloc.outstanding(), 0, "table pages leaked");
}

/// Two CPUs map neighbouring pages that both need the same new level-2 and level-3 tables:
/// exactly one install of each wins, the losers' tables are freed, both mappings are there.
#[test]
fn loom_map_race_installs_one_table() {
    model(|| {
        let (alloc, table) = new_table(SplitPolicy::Direct);
        let other = table.clone();
        let t = thread::spawn(move || other.map(0, 0x10_0000, PAGE, Attrs::RW).unwrap());
        table.map(PAGE, 0x20_0000, PAGE, Attrs::RO).unwrap();
        t.join().unwrap();
        assert_eq!(table.translate(8), Some((0x10_0008, Attrs::RW, 3)));
        assert_eq!(table.translate(PAGE), Some((0x20_0000, Attrs::RO, 3)));
        assert_eq!(table.translate(2 * PAGE), None);
        assert_eq!(table.table_pages(), ROOT_PAGES + 2);
        assert_eq!(alloc.outstanding(), ROOT_PAGES + 2, "a losing table leaked");
        finish(alloc, table);
    });
}

/// Two CPUs unmap different pages of the same block (Direct splits): both pages are gone, the
/// rest of the block still maps, exactly one split table survives and the loser's is freed.
#[test]
fn loom_concurrent_split_of_one_block() {
    model(|| {
        let (alloc, table) = new_table(SplitPolicy::Direct);
        let block = level_size(2);
        let (ipa, pa) = (0x1_0000, 0x40_0000);
        table.map(ipa, pa, block, Attrs::RWX).unwrap();
        assert_eq!(table.translate(ipa).unwrap().2, 2);
        let before = alloc.outstanding();
        let other = table.clone();
        let t = thread::spawn(move || {
            let mut gather = TlbGather::new();
            assert_eq!(other.unmap(ipa + PAGE, PAGE, &mut gather), Ok(PAGE));
            assert!(gather.take_freed().is_empty());
        });
        let mut gather = TlbGather::new();
        assert_eq!(table.unmap(ipa, PAGE, &mut gather), Ok(PAGE));
        assert!(gather.take_freed().is_empty());
        t.join().unwrap();
        assert_eq!(table.translate(ipa), None);
        assert_eq!(table.translate(ipa + PAGE), None);
        for page in 2..block / PAGE {
            let at = ipa + page * PAGE;
            assert_eq!(table.translate(at), Some((pa + page * PAGE, Attrs::RWX, 3)));
        }
        assert_eq!(
            alloc.outstanding(),
            before + 1,
            "exactly one split table survives"
        );
        finish(alloc, table);
    });
}

/// CPU A unmaps a whole level-2 entry's span (unlinking a level-3 table into its gather) and then
/// "syncs" and frees it, while CPU B maps and translates a disjoint range under the same level-2
/// table: B never touches the freed page (the allocator panics if it does).
#[test]
fn loom_deferred_free_never_reaches_a_neighbour() {
    model(|| {
        let (alloc, table) = new_table(SplitPolicy::Direct);
        let span = level_size(2);
        table.map(0, 0x10_0000, PAGE, Attrs::RW).unwrap();
        let other = table.clone();
        let t = thread::spawn(move || {
            other.map(span, 0x20_0000, PAGE, Attrs::RW).unwrap();
            assert_eq!(other.translate(span), Some((0x20_0000, Attrs::RW, 3)));
            assert_eq!(other.translate(span + PAGE), None);
        });
        let mut gather = TlbGather::new();
        assert_eq!(table.unmap(0, span, &mut gather), Ok(PAGE));
        let freed = gather.take_freed();
        assert_eq!(freed.len(), 1);
        table.free_deferred(freed.clone());
        t.join().unwrap();
        assert!(alloc.is_freed(freed[0]));
        assert_eq!(table.translate(0), None);
        assert_eq!(table.translate(span), Some((0x20_0000, Attrs::RW, 3)));
        // Root, the shared level-2 table, B's level-3 table.
        assert_eq!(alloc.outstanding(), ROOT_PAGES + 2);
        finish(alloc, table);
    });
}

/// The same race under break-before-make (no hook: the break is only recorded): the CPU that
/// loses the race to the splitting marker waits for the table and then unmaps in it.
#[test]
fn loom_break_before_make_split_race() {
    model(|| {
        let (alloc, table) = new_table(SplitPolicy::BreakBeforeMake);
        let block = level_size(2);
        let (ipa, pa) = (0x1_0000, 0x40_0000);
        table.map(ipa, pa, block, Attrs::RW).unwrap();
        let before = alloc.outstanding();
        let other = table.clone();
        let t = thread::spawn(move || {
            let mut gather = TlbGather::new();
            assert_eq!(other.unmap(ipa + 3 * PAGE, PAGE, &mut gather), Ok(PAGE));
        });
        let mut gather = TlbGather::new();
        assert_eq!(table.unmap(ipa, PAGE, &mut gather), Ok(PAGE));
        t.join().unwrap();
        assert_eq!(table.translate(ipa), None);
        assert_eq!(table.translate(ipa + 3 * PAGE), None);
        assert_eq!(table.translate(ipa + PAGE), Some((pa + PAGE, Attrs::RW, 3)));
        assert_eq!(alloc.outstanding(), before + 1);
        finish(alloc, table);
    });
}
