//! SMMUv3 command-queue throughput: the lock-free `CmdQueue` against the same queue behind one
//! lock.
//!
//! One operation is what a CPU does for a per-VM stage-2 TLB sync: four `CMD_TLBI_S2_IPA` and a
//! `CMD_SYNC`, issued together, returning once the sync completed. Every thread uses its own
//! VMID.
//!
//! The SMMU is a model that consumes the queue synchronously inside the PROD write, as QEMU's
//! SMMUv3 does: it reads every new entry, checks its opcode and advances CONS before the PROD
//! write returns. Two consumer profiles:
//! - `free`: the model costs nothing beyond reading the entries, so only the queue's own
//!   overhead (atomics, cache-line traffic, waiting) is measured;
//! - `mmio`: a PROD write costs `CMDQ_BENCH_PROD_NS` (default 1000 ns, a trapped MMIO write plus
//!   the emulator's dispatch), each consumed command `CMDQ_BENCH_CMD_NS` (default 100 ns), each
//!   CONS read `CMDQ_BENCH_CONS_NS` (default 200 ns, spent by the reading CPU alone). The numbers
//!   are synthetic; they only give the SMMU side a realistic shape: a fixed cost per PROD
//!   write, paid by one CPU at a time.
//!
//! Implementations:
//! - `lockfree`: `CmdQueue::issue(cmds, true)` from every thread at once.
//! - `mutex`: the same call with one `spin::Mutex<()>` held around it: a naive driver that
//!   serialises issue and wait.
//!
//! Each configuration is warmed up, then run 5 times for `CMDQ_BENCH_SECS` seconds (default
//! 0.5), the configurations interleaved; the median is reported with the spread of the
//! repetitions ((max - min) / median), the ratio to `mutex` and the average number of slots per
//! PROD write (batching across CPUs). Output: a table on stdout and JSON in `CMDQ_BENCH_JSON`
//! (default `target/bench/cmdq.json`). `CMDQ_BENCH_FILTER=lockfree-mmio` runs only the
//! configurations whose label (`impl-consumer-threads`) contains it.
//!
//! With more threads than free CPUs (a busy or small machine), `lockfree` can lose to `mutex`:
//! a CPU becomes owner when it reserves, and the CPUs whose commands it gathers wait for it, so a
//! descheduled owner stalls them, where a descheduled lock *waiter* stalls nobody (module docs of
//! `smmu::v3::cmdq`). The batching that makes the lock-free queue pay off needs three or more
//! CPUs issuing at once: with two, each PROD write still carries about one CPU's batch.
//!
//! Run without `--bench` (as `cargo test --benches` does), it only smoke-tests every
//! configuration briefly and writes no JSON.

mod common;

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyp::mm::stage2::backend::smmuv3::{OP_SYNC, OP_TLBI_S2_IPA, tlbi_s2_ipa};
use hyp::smmu::v3::cmdq::{CmdQueue, CmdqOptions, CmdqStats, QueueHw};

const REPS: usize = 5;
/// 256 entries: room for every thread's batch at once on a big machine.
const LOG2SIZE: u32 = 8;
/// TLBIs per operation (plus one `CMD_SYNC`).
const TLBIS: usize = 4;

/// Busy-waits for `ns` nanoseconds.
fn spin_for(ns: u64) {
    if ns == 0 {
        return;
    }
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_nanos(ns) {
        std::hint::spin_loop();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Costs {
    prod_ns: u64,
    cmd_ns: u64,
    cons_ns: u64,
}

/// The model SMMU: consumes inline on the PROD write.
struct ModelSmmu {
    base: usize,
    prod: AtomicU32,
    cons: AtomicU32,
    /// Set while a PROD write runs: two at once would be a queue bug.
    busy: AtomicBool,
    costs: Costs,
    consumed: AtomicU64,
}

impl QueueHw for ModelSmmu {
    fn write_prod(&self, prod: u32) {
        assert!(
            !self.busy.swap(true, Ordering::Acquire),
            "overlapping PROD writes"
        );
        spin_for(self.costs.prod_ns);
        self.prod.store(prod, Ordering::Relaxed);
        let wrap = (2u32 << LOG2SIZE) - 1;
        let mut cons = self.cons.load(Ordering::Relaxed);
        let mut n = 0;
        while cons != prod {
            let i = (cons & ((1 << LOG2SIZE) - 1)) as usize;
            // SAFETY: slots below PROD were written before the queue published them (the owner
            // acquired them before calling us) and are not rewritten until CONS passes them.
            let e = unsafe { (self.base as *const [u64; 2]).add(i).read_volatile() };
            let op = u64::from_le(e[0]) & 0xff;
            assert!(
                op == u64::from(OP_TLBI_S2_IPA) || op == u64::from(OP_SYNC),
                "bad command {op:#x} at {i}"
            );
            cons = (cons + 1) & wrap;
            n += 1;
        }
        spin_for(self.costs.cmd_ns * n);
        self.consumed.fetch_add(n, Ordering::Relaxed);
        self.cons.store(cons, Ordering::Release);
        self.busy.store(false, Ordering::Release);
    }

    fn read_cons(&self) -> u32 {
        spin_for(self.costs.cons_ns);
        self.cons.load(Ordering::Acquire)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Impl {
    LockFree,
    Mutex,
}

impl Impl {
    fn name(self) -> &'static str {
        match self {
            Impl::LockFree => "lockfree",
            Impl::Mutex => "mutex",
        }
    }
}

/// A queue, its model SMMU and its memory (dropped after the queue).
struct Subject {
    queue: CmdQueue,
    smmu: Arc<ModelSmmu>,
    lock: Option<spin::Mutex<()>>,
    _mem: Box<[[u64; 2]]>,
}

impl Subject {
    fn new(which: Impl, costs: Costs) -> Self {
        let mut mem = vec![[0u64; 2]; 1 << LOG2SIZE].into_boxed_slice();
        let smmu = Arc::new(ModelSmmu {
            base: mem.as_mut_ptr() as usize,
            prod: AtomicU32::new(0),
            cons: AtomicU32::new(0),
            busy: AtomicBool::new(false),
            costs,
            consumed: AtomicU64::new(0),
        });
        let opts = CmdqOptions {
            max_spins: 1 << 40,
            relax: std::hint::spin_loop,
            clean: None,
        };
        // SAFETY: `mem` holds `1 << LOG2SIZE` entries, outlives the queue (field order) and is
        // used by the queue and the model alone; the model starts empty.
        let queue = unsafe { CmdQueue::new(mem.as_mut_ptr(), LOG2SIZE, smmu.clone(), opts) };
        Subject {
            queue,
            smmu,
            lock: (which == Impl::Mutex).then(|| spin::Mutex::new(())),
            _mem: mem,
        }
    }

    fn op(&self, cmds: &[[u64; 2]]) {
        let _g = self.lock.as_ref().map(|l| l.lock());
        self.queue.issue(cmds, true).expect("issue");
    }
}

/// Runs `threads` threads doing operations for `dur`; returns operations per second.
fn run_once(subject: &Subject, threads: usize, dur: Duration) -> f64 {
    common::timed_threads(threads, dur, |t, stop| {
        let mut n = 0u64;
        let mut cmds = [[0u64; 2]; TLBIS];
        while !stop.load(Ordering::Relaxed) {
            for (j, c) in cmds.iter_mut().enumerate() {
                let ipa = ((n * TLBIS as u64 + j as u64) % 4096) << 12;
                *c = tlbi_s2_ipa(t as u16 + 1, ipa, true, 0, None);
            }
            subject.op(&cmds);
            n += 1;
        }
        n
    })
}

/// One configuration and its measurements.
struct Config {
    which: Impl,
    profile: &'static str,
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

    /// Queue slots per PROD write over the whole run (warm-up included).
    fn slots_per_batch(&self) -> f64 {
        let s: CmdqStats = self.subject.queue.stats();
        (s.commands + s.syncs) as f64 / s.batches.max(1) as f64
    }
}

fn measure(configs: &mut [Config], dur: Duration, reps: usize) {
    for c in configs.iter_mut() {
        run_once(&c.subject, c.threads, dur / 5);
    }
    for _ in 0..reps {
        for c in configs.iter_mut() {
            // Let the machine settle after the previous configuration.
            std::thread::sleep(Duration::from_millis(50));
            run_once(&c.subject, c.threads, dur / 10);
            let ops = run_once(&c.subject, c.threads, dur);
            c.reps.push(ops);
        }
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let smoke = common::smoke();
    let (secs, reps) = (common::secs("CMDQ", 0.5), if smoke { 1 } else { REPS });
    let dur = Duration::from_secs_f64(secs);
    let thread_counts = common::thread_counts();
    let n = *thread_counts.last().unwrap_or(&1);
    let mmio = Costs {
        prod_ns: env_u64("CMDQ_BENCH_PROD_NS", 1000),
        cmd_ns: env_u64("CMDQ_BENCH_CMD_NS", 100),
        cons_ns: env_u64("CMDQ_BENCH_CONS_NS", 200),
    };
    let free = Costs {
        prod_ns: 0,
        cmd_ns: 0,
        cons_ns: 0,
    };
    let load = common::load_average();

    let filter = std::env::var("CMDQ_BENCH_FILTER").unwrap_or_default();
    let mut configs = Vec::new();
    for (profile, costs) in [("free", free), ("mmio", mmio)] {
        for &threads in &thread_counts {
            for which in [Impl::LockFree, Impl::Mutex] {
                if !format!("{}-{profile}-{threads}", which.name()).contains(&filter) {
                    continue;
                }
                configs.push(Config {
                    which,
                    profile,
                    threads,
                    subject: Subject::new(which, costs),
                    reps: Vec::new(),
                });
            }
        }
    }
    measure(&mut configs, dur, reps);
    for c in &configs {
        // Everything issued was consumed, and nothing twice.
        let s = c.subject.queue.stats();
        assert_eq!(
            c.subject.smmu.consumed.load(Ordering::Relaxed),
            s.commands + s.syncs
        );
    }

    let load_text = load.map_or("unknown".to_string(), |l| format!("{l:.2}"));
    println!(
        "SMMUv3 cmdq: {TLBIS} x TLBI_S2_IPA + CMD_SYNC per op, {reps} x {secs} s per \
         configuration, median ({n} CPUs, load average {load_text} before the run); mmio \
         profile: PROD write {} ns, {} ns per command, CONS read {} ns",
        mmio.prod_ns, mmio.cmd_ns, mmio.cons_ns
    );
    println!(
        "{:<9} {:>8} {:>7} {:>12} {:>7} {:>9} {:>11}",
        "impl", "consumer", "threads", "ops/s", "spread", "vs-mutex", "slots/PROD"
    );
    let find = |which: Impl, profile: &str, threads: usize| {
        configs
            .iter()
            .find(|c| c.which == which && c.profile == profile && c.threads == threads)
            .map(Config::median)
    };
    let mut json = String::from("{\n  \"benchmark\": \"cmdq\",\n");
    let _ = writeln!(json, "  \"seconds_per_rep\": {secs},");
    let _ = writeln!(json, "  \"reps\": {reps},");
    let _ = writeln!(json, "  \"cpus\": {n},");
    let _ = writeln!(json, "  \"tlbis_per_op\": {TLBIS},");
    let _ = writeln!(
        json,
        "  \"mmio_profile\": {{\"prod_ns\": {}, \"cmd_ns\": {}, \"cons_ns\": {}}},",
        mmio.prod_ns, mmio.cmd_ns, mmio.cons_ns
    );
    let _ = writeln!(
        json,
        "  \"load_average_before\": {},",
        load.map_or("null".to_string(), |l| format!("{l:.2}"))
    );
    json += "  \"results\": [\n";
    for (i, c) in configs.iter().enumerate() {
        let ops = c.median();
        let ratio = find(Impl::Mutex, c.profile, c.threads).map(|b| ops / b);
        println!(
            "{:<9} {:>8} {:>7} {:>12.0} {:>6.0}% {:>9} {:>11.2}",
            c.which.name(),
            c.profile,
            c.threads,
            ops,
            c.spread() * 100.0,
            ratio.map_or("-".to_string(), |r| format!("{r:.2}x")),
            c.slots_per_batch(),
        );
        let reps: Vec<String> = c.reps.iter().map(|v| format!("{v:.0}")).collect();
        let _ = write!(
            json,
            "    {{\"impl\": \"{}\", \"consumer\": \"{}\", \"threads\": {}, \"ops_per_sec\": \
             {ops:.0}, \"reps\": [{}], \"vs_mutex\": {}, \"slots_per_prod_write\": {:.3}}}",
            c.which.name(),
            c.profile,
            c.threads,
            reps.join(", "),
            ratio.map_or("null".to_string(), |r| format!("{r:.4}")),
            c.slots_per_batch(),
        );
        json += if i + 1 < configs.len() { ",\n" } else { "\n" };
    }
    json += "  ]\n}\n";

    common::write_json("CMDQ", "cmdq", &json);
}
