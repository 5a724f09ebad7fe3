//! Stage-2 map+unmap throughput: the lock-free table against a global lock and against
//! `aarch64-paging`.
//!
//! One operation is `map` then `unmap` of one 4 KiB page or one 2 MiB block, followed by the
//! sync of the unmap's gather (with no agents: the host has no TLB to maintain, so the sync only
//! frees what the unmap unlinked — nothing here, since tables that become empty stay). Every
//! thread cycles over its own IPAs; all threads work inside one 1 GiB region, so they share the
//! level-1 entry and the level-2 table (and, for blocks, the entries' cache lines).
//!
//! Implementations:
//! - `lockfree`: `Stage2` on a `PagePool`, no lock (release builds keep no debug registry).
//! - `global-lock`: the same table with one `spin::Mutex<()>` taken around every map and every
//!   unmap+sync: what a table behind a per-VM lock costs.
//! - `aarch64-paging`: `aarch64_paging::idmap::IdMap<Stage2>` (identity map, so PA = IPA for
//!   all three) behind a `spin::Mutex`; unmap is `map_range` with flags that lack `VALID`, as the
//!   crate documents.
//!
//! Each configuration is warmed up, then run `REPS` times for `STAGE2_BENCH_SECS` seconds
//! (default 0.5), the configurations interleaved; the median is reported, with the spread of the
//! repetitions ((max - min) / median: large values mean the machine was busy). Output: a table on
//! stdout and JSON in `STAGE2_BENCH_JSON` (default `target/bench/stage2.json`).
//! `STAGE2_BENCH_FILTER=lockfree-4K` runs only the configurations whose label contains it.
//!
//! Run without `--bench` (as `cargo test --benches` does), it only smoke-tests every
//! configuration briefly and writes no JSON.

mod common;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aarch64_paging::descriptor::Stage2Attributes;
use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::{MemoryRegion, Stage2 as PagingStage2};
use hyp::mm::pgtable::Attrs;
use hyp::mm::stage2::{
    AtomicU64, PageAllocator, PagePool, SplitPolicy, Stage2, Stage2Config, Stage2Table, TlbGather,
};

const PAGE: u64 = 4096;
const BLOCK: u64 = 2 << 20;
/// The 1 GiB region every thread works in.
const REGION: u64 = 0x4000_0000;
/// IPAs each thread cycles over.
const PER_THREAD: u64 = 64;
const REPS: usize = 5;

/// Table memory for the benchmark: a zeroed, 64 KiB aligned arena handed out by a lock-free
/// bump pointer ("physical address" = host address). Pages are never reused by the arena
/// itself; the `PagePool` in front of it recycles them.
struct Arena {
    base: u64,
    pages: usize,
    next: AtomicUsize,
}

impl Arena {
    const ALIGN: usize = 64 << 10;

    fn new(pages: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(pages * PAGE as usize, Self::ALIGN)
            .expect("arena layout");
        // SAFETY: the layout has a non-zero size.
        let base = unsafe { std::alloc::alloc_zeroed(layout) } as u64;
        assert_ne!(base, 0, "out of memory for the arena");
        Self {
            base,
            pages,
            next: AtomicUsize::new(0),
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        let layout =
            std::alloc::Layout::from_size_align(self.pages * PAGE as usize, Self::ALIGN).unwrap();
        // SAFETY: allocated in `new` with this layout; the tables using it are gone.
        unsafe { std::alloc::dealloc(self.base as *mut u8, layout) };
    }
}

impl PageAllocator for Arena {
    fn alloc_page(&self) -> Option<u64> {
        self.alloc_pages(1)
    }

    fn alloc_pages(&self, pages: usize) -> Option<u64> {
        let mut next = self.next.load(Ordering::Relaxed);
        loop {
            let start = next.next_multiple_of(pages);
            if start + pages > self.pages {
                return None;
            }
            match self.next.compare_exchange(
                next,
                start + pages,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(self.base + start as u64 * PAGE),
                Err(actual) => next = actual,
            }
        }
    }

    fn free_page(&self, _pa: u64) {}

    fn free_pages(&self, _pa: u64, _pages: usize) {}

    fn table(&self, pa: u64) -> *const AtomicU64 {
        pa as *const AtomicU64
    }
}

type OurStage2 = Stage2<PagePool<Arena>, ()>;

fn our_stage2() -> OurStage2 {
    let cfg = Stage2Config {
        ipa_bits: 40,
        split: SplitPolicy::Direct,
        coherent_walk: true,
    };
    let table = Stage2Table::new(cfg, PagePool::new(Arena::new(4096), 64), ()).expect("table");
    Stage2::new(table, 1, Vec::new())
}

/// An `IdMap` that may move between threads: it owns its tables, and every use is serialised by
/// the mutex around it.
struct SendIdMap(IdMap<PagingStage2>);

// SAFETY: the IdMap's raw pointers are to tables only it owns (allocated from the global
// allocator); it is only touched with the mutex held, one thread at a time.
unsafe impl Send for SendIdMap {}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Impl {
    LockFree,
    GlobalLock,
    Paging,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::LockFree => "lockfree",
            Impl::GlobalLock => "global-lock",
            Impl::Paging => "aarch64-paging",
        }
    }
}

/// One implementation under test, shared by the threads.
enum Subject {
    Ours {
        s2: OurStage2,
        lock: Option<spin::Mutex<()>>,
    },
    Paging(spin::Mutex<SendIdMap>),
}

impl Subject {
    fn new(which: Impl) -> Self {
        match which {
            Impl::LockFree => Subject::Ours {
                s2: our_stage2(),
                lock: None,
            },
            Impl::GlobalLock => Subject::Ours {
                s2: our_stage2(),
                lock: Some(spin::Mutex::new(())),
            },
            Impl::Paging => {
                Subject::Paging(spin::Mutex::new(SendIdMap(IdMap::new(1, PagingStage2))))
            }
        }
    }

    /// One map + unmap (+ sync) of `[ipa, ipa + size)`.
    fn op(&self, ipa: u64, size: u64, gather: &mut TlbGather) {
        match self {
            Subject::Ours { s2, lock } => {
                {
                    let _g = lock.as_ref().map(|l| l.lock());
                    s2.table.map(ipa, ipa, size, Attrs::RW).expect("map");
                }
                let _g = lock.as_ref().map(|l| l.lock());
                s2.unmap(ipa, size, gather).expect("unmap");
                s2.sync(gather).expect("sync");
            }
            Subject::Paging(m) => {
                let region = MemoryRegion::new(ipa as usize, (ipa + size) as usize);
                let flags = Stage2Attributes::VALID
                    | Stage2Attributes::ACCESS_FLAG
                    | Stage2Attributes::MEMATTR_NORMAL_INNER_WB
                    | Stage2Attributes::MEMATTR_NORMAL_OUTER_WB
                    | Stage2Attributes::SH_INNER
                    | Stage2Attributes::S2AP_ACCESS_RW
                    | Stage2Attributes::XN;
                m.lock().0.map_range(&region, flags).expect("map");
                m.lock()
                    .0
                    .map_range(&region, Stage2Attributes::empty())
                    .expect("unmap");
            }
        }
    }
}

/// The IPA of thread `t`'s `i`-th operation: pages in the thread's own 2 MiB slot, blocks in
/// its own run of `PER_THREAD` blocks; everything inside one 1 GiB region.
fn ipa(size: u64, t: usize, i: u64) -> u64 {
    let t = t as u64;
    if size == PAGE {
        REGION + t * BLOCK + (i % PER_THREAD) * PAGE
    } else {
        REGION + (t * PER_THREAD + i % PER_THREAD) * BLOCK
    }
}

/// Runs `threads` threads doing operations for `dur`; returns operations per second.
fn run_once(subject: &Subject, size: u64, threads: usize, dur: Duration) -> f64 {
    common::timed_threads(threads, dur, |t, stop| {
        let mut gather = TlbGather::new();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            subject.op(ipa(size, t, n), size, &mut gather);
            n += 1;
        }
        n
    })
}

/// One configuration and its measurements.
struct Config {
    which: Impl,
    size: u64,
    threads: usize,
    subject: Subject,
    reps: Vec<f64>,
}

impl Config {
    fn median(&self) -> f64 {
        common::median(&self.reps)
    }

    fn spread(&self) -> f64 {
        common::spread(&self.reps)
    }
}

/// Measures every configuration `reps` times, interleaved (one round runs each configuration
/// once), so that a burst of load elsewhere on the machine hits all of them alike.
fn measure(configs: &mut [Config], dur: Duration, reps: usize) {
    for c in configs.iter_mut() {
        // Warm-up: builds the tables, fills the pool, warms the caches.
        run_once(&c.subject, c.size, c.threads, dur / 5);
    }
    for _ in 0..reps {
        for c in configs.iter_mut() {
            // Let the machine settle after the previous configuration (a contended spin lock
            // makes a virtual machine's host deschedule our vCPUs), and get every thread of this
            // one running before the clock starts.
            std::thread::sleep(Duration::from_millis(50));
            run_once(&c.subject, c.size, c.threads, dur / 10);
            let ops = run_once(&c.subject, c.size, c.threads, dur);
            c.reps.push(ops);
        }
    }
}

fn size_name(size: u64) -> &'static str {
    if size == PAGE { "4K" } else { "2M" }
}

fn find(configs: &[Config], which: Impl, size: u64, threads: usize) -> Option<f64> {
    configs
        .iter()
        .find(|c| c.which == which && c.size == size && c.threads == threads)
        .map(Config::median)
}

fn main() {
    let smoke = common::smoke();
    let (secs, reps) = (common::secs("STAGE2", 0.5), if smoke { 1 } else { REPS });
    let dur = Duration::from_secs_f64(secs);
    let thread_counts = common::thread_counts();
    let n = *thread_counts.last().unwrap_or(&1);
    let load = common::load_average();

    // Optional: only the configurations whose label ("lockfree-4K-2") contains this.
    let filter = std::env::var("STAGE2_BENCH_FILTER").unwrap_or_default();
    let mut configs = Vec::new();
    for size in [PAGE, BLOCK] {
        for &threads in &thread_counts {
            for which in [Impl::LockFree, Impl::GlobalLock, Impl::Paging] {
                let label = format!("{}-{}-{threads}", which.name(), size_name(size));
                if !label.contains(&filter) {
                    continue;
                }
                configs.push(Config {
                    which,
                    size,
                    threads,
                    subject: Subject::new(which),
                    reps: Vec::new(),
                });
            }
        }
    }
    measure(&mut configs, dur, reps);
    let results = &configs;

    let load_text = load.map_or("unknown".to_string(), |l| format!("{l:.2}"));
    println!(
        "stage-2 map+unmap, {reps} x {secs} s per configuration, median ({n} CPUs, load \
         average {load_text} before the run)"
    );
    println!(
        "{:<15} {:>4} {:>7} {:>14} {:>7} {:>10} {:>10} {:>9}",
        "impl", "size", "threads", "ops/s", "spread", "vs-lock", "vs-paging", "scaling"
    );
    let mut json = String::from("{\n  \"benchmark\": \"stage2\",\n");
    let _ = writeln!(json, "  \"seconds_per_rep\": {secs},");
    let _ = writeln!(json, "  \"reps\": {reps},");
    let _ = writeln!(json, "  \"cpus\": {n},");
    let _ = writeln!(
        json,
        "  \"load_average_before\": {},",
        load.map_or("null".to_string(), |l| format!("{l:.2}"))
    );
    json += "  \"results\": [\n";
    for (i, r) in results.iter().enumerate() {
        let ops = r.median();
        let ratio = |base: Impl| find(results, base, r.size, r.threads).map(|b| ops / b);
        let scaling = find(results, r.which, r.size, 1).map(|one| ops / one);
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}x"));
        println!(
            "{:<15} {:>4} {:>7} {:>14.0} {:>6.0}% {:>10} {:>10} {:>9}",
            r.which.name(),
            size_name(r.size),
            r.threads,
            ops,
            r.spread() * 100.0,
            show(ratio(Impl::GlobalLock)),
            show(ratio(Impl::Paging)),
            show(scaling),
        );
        let num = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.4}"));
        let reps: Vec<String> = r.reps.iter().map(|v| format!("{v:.0}")).collect();
        let _ = write!(
            json,
            "    {{\"impl\": \"{}\", \"size\": \"{}\", \"threads\": {}, \"ops_per_sec\": {:.0}, \
             \"reps\": [{}], \"vs_global_lock\": {}, \"vs_aarch64_paging\": {}, \
             \"scaling_vs_1_thread\": {}}}",
            r.which.name(),
            size_name(r.size),
            r.threads,
            ops,
            reps.join(", "),
            num(ratio(Impl::GlobalLock)),
            num(ratio(Impl::Paging)),
            num(scaling),
        );
        json += if i + 1 < results.len() { ",\n" } else { "\n" };
    }
    json += "  ]\n}\n";

    common::write_json("STAGE2", "stage2", &json);
}
