//! Runtime-PM fast path: get+put pairs per second on an active domain.
//!
//! Implementations:
//! - `lockfree`: `hyp::power::rpm::Domain` — `get` is one `fetch_add`, `put` one `fetch_sub`.
//! - `mutex`: the same bookkeeping (usage count, state, last-idle time) under one
//!   `spin::Mutex` per domain, as a driver that takes its PM lock on every map/unmap would.
//!
//! Every thread takes and drops references on the same domain, which stays active (the delay is
//! infinite), so only the fast path is measured. Thread counts: 1, 2, 4 and the CPU count (when
//! larger). Each configuration is warmed up, then run `REPS` times for `POWER_BENCH_SECS` seconds
//! (default 0.3), interleaved; the median is reported with the spread of the repetitions and the
//! ratio lockfree / mutex. Output: a table on stdout and JSON in `POWER_BENCH_JSON` (default
//! `target/bench/power.json`).
//!
//! Run without `--bench` (as `cargo test --benches` does), it only smoke-tests every
//! configuration briefly and writes no JSON.

mod common;

use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyp::power::PowerError;
use hyp::power::rpm::{Domain, PowerOps};

const REPS: usize = 5;

/// Power ops that do nothing (the fast path never calls them).
struct Nop;

impl PowerOps for Nop {
    fn power_on(&self) -> Result<(), PowerError> {
        Ok(())
    }
    fn power_off(&self) -> Result<(), PowerError> {
        Ok(())
    }
    fn now(&self) -> u64 {
        0
    }
}

/// The baseline: runtime PM with the count under a per-domain spin lock.
struct MutexRpm {
    inner: spin::Mutex<MutexState>,
}

struct MutexState {
    count: u32,
    active: bool,
    last_idle: u64,
}

impl MutexRpm {
    fn get(&self) {
        let mut s = self.inner.lock();
        if !s.active {
            Nop.power_on().unwrap();
            s.active = true;
        }
        s.count += 1;
    }

    fn put(&self) {
        let mut s = self.inner.lock();
        s.count -= 1;
        if s.count == 0 {
            s.last_idle = Nop.now();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
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

/// Runs `threads` threads doing get+put pairs for `secs`; returns pairs per second.
fn run(which: Impl, threads: usize, secs: f64) -> f64 {
    let dom = Arc::new(Domain::new(Nop, u64::MAX, true));
    let mtx = Arc::new(MutexRpm {
        inner: spin::Mutex::new(MutexState {
            count: 0,
            active: true,
            last_idle: 0,
        }),
    });
    let rate = common::timed_threads(threads, Duration::from_secs_f64(secs), |_, stop| {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for _ in 0..256 {
                match which {
                    Impl::LockFree => drop(black_box(dom.get().unwrap())),
                    Impl::Mutex => {
                        mtx.get();
                        black_box(&mtx);
                        mtx.put();
                    }
                }
            }
            n += 256;
        }
        n
    });
    assert_eq!(dom.usage(), 0);
    assert_eq!(dom.stats().power_ups, 0, "the fast path never powers up");
    rate
}

fn main() {
    let smoke = common::smoke();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let secs = common::secs("POWER", 0.3);
    let reps = if smoke { 1 } else { REPS };
    let mut counts = vec![1, 2, 4];
    if cpus > 4 {
        counts.push(cpus);
    }
    counts.retain(|&t| t <= cpus.max(1) || t == 1);
    let impls = [Impl::LockFree, Impl::Mutex];
    // Warm-up.
    for &i in &impls {
        run(i, 1, secs / 4.0);
    }
    let mut samples = vec![vec![Vec::new(); impls.len()]; counts.len()];
    for _ in 0..reps {
        for (ci, &t) in counts.iter().enumerate() {
            for (ii, &i) in impls.iter().enumerate() {
                samples[ci][ii].push(run(i, t, secs));
            }
        }
    }
    println!(
        "runtime-PM get+put pairs/s on an active domain ({cpus} CPUs, {reps} reps x {secs} s)"
    );
    println!(
        "{:>8} {:>10} {:>14} {:>8} {:>10}",
        "threads", "impl", "pairs/s", "spread", "vs mutex"
    );
    let mut json = String::from("{\n  \"benchmark\": \"power\",\n");
    let _ = writeln!(json, "  \"seconds_per_rep\": {secs},");
    let _ = writeln!(json, "  \"reps\": {reps},");
    let _ = writeln!(json, "  \"cpus\": {cpus},");
    json += "  \"results\": [\n";
    let mut rows = Vec::new();
    for (ci, &t) in counts.iter().enumerate() {
        let meds: Vec<f64> = samples[ci].iter_mut().map(|s| common::median(s)).collect();
        for (ii, &i) in impls.iter().enumerate() {
            let s = &samples[ci][ii];
            let max = s.iter().cloned().fold(f64::MIN, f64::max);
            let min = s.iter().cloned().fold(f64::MAX, f64::min);
            let spread = (max - min) / meds[ii];
            let ratio = meds[ii] / meds[1];
            println!(
                "{t:>8} {:>10} {:>14.0} {:>7.1}% {:>9.2}x",
                i.name(),
                meds[ii],
                spread * 100.0,
                ratio
            );
            rows.push(format!(
                "    {{\"impl\": \"{}\", \"threads\": {t}, \"pairs_per_s\": {:.0}, \"spread\": {:.4}, \"ratio_vs_mutex\": {:.3}}}",
                i.name(),
                meds[ii],
                spread,
                ratio
            ));
        }
    }
    json += &rows.join(",\n");
    json += "\n  ]\n}\n";
    common::write_json("POWER", "power", &json);
}
