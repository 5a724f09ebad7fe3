//! What every host benchmark shares: how long to run, medians and spreads of repetitions, the
//! machine's load before the run, and where the JSON goes. `cargo bench` passes `--bench`;
//! `cargo test --benches` does not, and then a benchmark only smoke-tests (short runs, no JSON).

// Each benchmark uses only part of this module.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Barrier;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// True when run without `--bench` (as `cargo test --benches` does): smoke-test only.
pub fn smoke() -> bool {
    !std::env::args().any(|a| a == "--bench")
}

/// Seconds per repetition: `<PREFIX>_BENCH_SECS`, else `default`; 0.01 in a smoke run.
pub fn secs(prefix: &str, default: f64) -> f64 {
    if smoke() {
        return 0.01;
    }
    std::env::var(format!("{prefix}_BENCH_SECS"))
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// `1` and, on a machine with more, one thread per CPU.
pub fn thread_counts() -> Vec<usize> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if n > 1 { vec![1, n] } else { vec![1] }
}

/// The 1-minute load average before the run (Linux), to judge how quiet the machine was.
pub fn load_average() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Median of the repetitions.
pub fn median(reps: &[f64]) -> f64 {
    let mut r = reps.to_vec();
    r.sort_by(f64::total_cmp);
    r[r.len() / 2]
}

/// (max - min) / median of the repetitions: large when something else was running.
pub fn spread(reps: &[f64]) -> f64 {
    let max = reps.iter().copied().fold(f64::MIN, f64::max);
    let min = reps.iter().copied().fold(f64::MAX, f64::min);
    (max - min) / median(reps)
}

/// Writes `json` to `<PREFIX>_BENCH_JSON`, else `target/bench/<name>.json`; nothing in a smoke
/// run.
pub fn write_json(prefix: &str, name: &str, json: &str) {
    if smoke() {
        println!("smoke run (no --bench): no JSON written");
        return;
    }
    let path = std::env::var_os(format!("{prefix}_BENCH_JSON")).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../target/bench/{name}.json")),
        PathBuf::from,
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("create the JSON folder");
    }
    std::fs::write(&path, json).expect("write the JSON");
    println!("JSON: {}", path.display());
}

/// Runs `worker(t, stop)` on `threads` threads from a common start for `dur`, then sets `stop`;
/// each worker loops until it sees `stop` and returns how many operations it did. Returns
/// operations per second over `dur` (the workers finish their last operation a few
/// microseconds later: negligible at these run lengths).
pub fn timed_threads<F>(threads: usize, dur: Duration, worker: F) -> f64
where
    F: Fn(usize, &AtomicBool) -> u64 + Sync,
{
    let stop = AtomicBool::new(false);
    let start = Barrier::new(threads + 1);
    let total = AtomicU64::new(0);
    let mut elapsed = Duration::ZERO;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (stop, start, total, worker) = (&stop, &start, &total, &worker);
            s.spawn(move || {
                start.wait();
                total.fetch_add(worker(t, stop), Ordering::Relaxed);
            });
        }
        start.wait();
        let t0 = Instant::now();
        std::thread::sleep(dur);
        stop.store(true, Ordering::Relaxed);
        elapsed = t0.elapsed();
    });
    total.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
}
