//! `cargo xtask test`, `clippy` and `fmt`: the checks CI runs.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::board;
use crate::image::{self, GUEST_TARGET, HYP_TARGET, Profile};
use crate::qemu;
use crate::systest::{self, SCENARIOS};
use crate::util::{self, cargo};

/// `cargo fmt --all [--check]`.
pub fn fmt(check: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["fmt", "--all"]);
    if check {
        cmd.arg("--check");
    }
    util::run(&mut cmd)
}

/// Host clippy: `hyp` (its portable parts) and `xtask`, all targets.
pub fn clippy_host() -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["clippy", "-p", "hyp", "-p", "xtask", "--all-targets"])
        .args(["--", "-D", "warnings"])
        .env_remove("HYP_BOARD_CONFIG");
    util::run(&mut cmd)
}

/// Clippy of `hyp` for its bare-metal target, with the default board's generated config.
pub fn clippy_hyp() -> Result<()> {
    let root = util::root();
    let (file, source) = board::load(&root, systest::BOARD)?;
    let board = file.validate(&source, &root.join("guests"))?;
    let payloads = image::build_payloads(&board, Profile::Release)?;
    let config = image::write_config(&board, &source, "clippy", &payloads)?;
    let mut cmd = cargo();
    cmd.args(["clippy", "-p", "hyp", "--target", HYP_TARGET])
        .args(["--", "-D", "warnings"])
        .env("HYP_BOARD_CONFIG", &config);
    util::run(&mut cmd)
}

/// The guest crates: folders under `guests/` with a `Cargo.toml`.
fn guest_crates() -> Result<Vec<String>> {
    let dir = util::root().join("guests");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("Cargo.toml").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

/// Clippy of every guest for its bare-metal target.
pub fn clippy_guests() -> Result<()> {
    let mut cmd = cargo();
    cmd.arg("clippy");
    for g in guest_crates()? {
        cmd.args(["-p", &g]);
    }
    cmd.args(["--target", GUEST_TARGET, "--", "-D", "warnings"]);
    util::run(&mut cmd)
}

/// `cargo xtask clippy`.
pub fn clippy() -> Result<()> {
    clippy_host()?;
    clippy_hyp()?;
    clippy_guests()
}

/// Set by `cargo xtask test --long`: randomised tests run far longer.
static LONG: AtomicBool = AtomicBool::new(false);

/// Host unit tests.
pub fn unit_tests() -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["test", "-p", "hyp", "-p", "xtask"])
        .env_remove("HYP_BOARD_CONFIG");
    if LONG.load(Ordering::Relaxed) {
        cmd.env("VSMMU_FUZZ_STEPS", "10000000").arg("--release");
    }
    util::run(&mut cmd)
}

/// The `loom` models of the lock-free code (stage-2 table install, block split, deferred free,
/// page pool), in a target directory of their own because `--cfg loom` rebuilds everything.
pub fn loom_models() -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["test", "-p", "hyp", "--release", "--lib", "loom"])
        .env("RUSTFLAGS", "--cfg loom")
        .env("CARGO_TARGET_DIR", util::root().join("target/loom"))
        .env_remove("HYP_BOARD_CONFIG");
    util::run(&mut cmd)
}

/// What `cargo xtask test` runs.
pub struct TestPlan {
    pub host: bool,
    pub qemu: bool,
    /// Scenario names; empty means all.
    pub only: Vec<String>,
    /// Per-test QEMU timeout; `None`: each test's own.
    pub timeout: Option<Duration>,
    /// Long randomised runs.
    pub long: bool,
}

struct Tally {
    passed: usize,
    results: Vec<(String, bool, Duration)>,
}

impl Tally {
    fn record(&mut self, name: &str, ok: bool, took: Duration) {
        println!(
            "xtask test: {name} ... {} ({:.1} s)",
            if ok { "PASS" } else { "FAIL" },
            took.as_secs_f64()
        );
        if ok {
            self.passed += 1;
        }
        self.results.push((name.to_owned(), ok, took));
    }

    /// Prints the summary and the closing line CI parses; returns whether all passed.
    fn finish(&self) -> bool {
        let failed = self.results.iter().filter(|r| !r.1).count();
        println!();
        println!("summary:");
        for (name, ok, took) in &self.results {
            println!(
                "  {} {name} ({:.1} s)",
                if *ok { "PASS" } else { "FAIL" },
                took.as_secs_f64()
            );
        }
        if failed > 0 {
            println!("stopped at the first failure; later steps did not run");
        }
        println!("xtask: {} passed, {failed} failed", self.passed);
        failed == 0
    }
}

/// Runs one step, recording it; `false` stops the run.
fn step(tally: &mut Tally, name: &str, f: impl FnOnce() -> Result<Vec<String>>) -> bool {
    println!("\n==> {name}");
    let start = Instant::now();
    let ok = match f() {
        Ok(failures) if failures.is_empty() => true,
        Ok(failures) => {
            for f in failures {
                println!("    {name}: {f}");
            }
            false
        }
        Err(e) => {
            println!("    {name}: {e:#}");
            false
        }
    };
    tally.record(name, ok, start.elapsed());
    ok
}

fn ok(r: Result<()>) -> Result<Vec<String>> {
    r.map(|()| Vec::new())
}

/// `cargo xtask test`: returns whether everything passed.
pub fn test(plan: &TestPlan) -> Result<bool> {
    LONG.store(plan.long, Ordering::Relaxed);
    for name in &plan.only {
        if !SCENARIOS.iter().any(|s| s.name == name) {
            let names: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
            anyhow::bail!("no system test {name:?} (tests: {})", names.join(", "));
        }
    }
    let mut tally = Tally {
        passed: 0,
        results: Vec::new(),
    };
    let all_ok = run_steps(plan, &mut tally);
    Ok(tally.finish() && all_ok)
}

fn run_steps(plan: &TestPlan, tally: &mut Tally) -> bool {
    if plan.host {
        type Step = (&'static str, fn() -> Result<()>);
        let host: [Step; 6] = [
            ("fmt", || fmt(true)),
            ("clippy (host)", clippy_host),
            ("clippy (hyp, aarch64-unknown-none-softfloat)", clippy_hyp),
            ("clippy (guests, aarch64-unknown-none)", clippy_guests),
            ("unit tests", unit_tests),
            ("loom models", loom_models),
        ];
        for (name, f) in host {
            if !step(tally, name, || ok(f())) {
                return false;
            }
        }
    }
    if !plan.qemu {
        return true;
    }
    let qemu: PathBuf = match qemu::find() {
        Ok(q) => q,
        Err(e) => {
            println!("    qemu: {e:#}");
            tally.record("qemu", false, Duration::ZERO);
            return false;
        }
    };
    for s in SCENARIOS {
        if !plan.only.is_empty() && !plan.only.iter().any(|n| n == s.name) {
            continue;
        }
        if !step(tally, &format!("system test {}", s.name), || {
            println!("    {}", s.about);
            systest::run(s, &qemu, plan.timeout)
        }) {
            return false;
        }
    }
    true
}
