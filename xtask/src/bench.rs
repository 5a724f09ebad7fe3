//! `cargo xtask bench`: runs the host benchmarks of the hypervisor's portable code and the Linux
//! benchmark under QEMU, and says where their results are.
//!
//! Each host benchmark is a `harness = false` bench target of the `hyp` crate, built with
//! cargo's bench (release) profile. It prints a table and writes JSON to the path in its
//! environment variable `<NAME>_BENCH_JSON` (upper case), which xtask points at
//! `target/bench/<name>.json`. `linux` is no bench target: xtask boots Linux under QEMU itself
//! (see `linux_bench.rs`) and writes `target/bench/linux.json`.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::util;

/// The benchmarks there are: bench targets of the `hyp` crate, and `linux` (QEMU boots).
pub const BENCHES: &[&str] = &["stage2", "cmdq", "power", "linux"];

/// Where benchmark `name` writes its JSON.
pub fn json_path(name: &str) -> PathBuf {
    util::target_dir()
        .join("bench")
        .join(format!("{name}.json"))
}

/// The environment variable that tells benchmark `name` where to write its JSON.
pub fn json_env(name: &str) -> String {
    format!("{}_BENCH_JSON", name.to_uppercase())
}

/// The benchmarks to run for the names given (all when none), in order, without duplicates.
pub fn select(names: &[String]) -> Result<Vec<&'static str>> {
    if names.is_empty() {
        return Ok(BENCHES.to_vec());
    }
    let mut out = Vec::new();
    for n in names {
        match BENCHES.iter().find(|b| *b == n) {
            Some(b) if !out.contains(b) => out.push(*b),
            Some(_) => {}
            None => bail!("unknown benchmark {n:?} (known: {})", BENCHES.join(", ")),
        }
    }
    Ok(out)
}

/// Runs the benchmarks `names` (all when empty).
pub fn run(names: &[String]) -> Result<()> {
    let benches = select(names)?;
    for name in &benches {
        if *name == "linux" {
            crate::linux_bench::run()?;
            continue;
        }
        let json = json_path(name);
        if let Some(dir) = json.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut cmd = util::cargo();
        cmd.args(["bench", "-p", "hyp", "--bench", name])
            .env(json_env(name), &json);
        util::run(&mut cmd)?;
        println!("xtask: {name} results: {}", util::rel(&json));
        if *name == "power" {
            power_resume()?;
        }
    }
    Ok(())
}

/// Runs of the `power` system test for the resume-cost numbers.
const RESUME_RUNS: usize = 3;

/// SMMU resume cost under QEMU: boots the `power` system test (100 power cycles in vm0) a few
/// times and reads the hypervisor's counters: the mean and worst resume (power-up, full
/// re-programming from the shadow, invalidation, enable) against the boot-time probe and reset
/// of the same SMMU in the same run.
fn power_resume() -> Result<()> {
    let qemu = crate::qemu::find()?;
    let scenario = crate::systest::SCENARIOS
        .iter()
        .find(|s| s.name == "power")
        .expect("the power system test");
    let mut rows = Vec::new();
    for run in 0..RESUME_RUNS {
        let (outcome, failures) = crate::systest::run_outcome(
            scenario,
            &qemu,
            std::time::Duration::from_secs(300),
            false,
        )?;
        if !failures.is_empty() {
            bail!("power run {run} failed: {}", failures.join("; "));
        }
        let line = outcome
            .output
            .lines()
            .find(|l| l.contains("hyp: SMMU power:"))
            .unwrap_or_default();
        let r = parse_resume(line)
            .ok_or_else(|| anyhow::anyhow!("no SMMU power counters in run {run}: {line:?}"))?;
        rows.push(r);
    }
    let median = |f: fn(&Resume) -> f64| {
        let mut v: Vec<f64> = rows.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mean = median(|r| r.mean_us);
    let max = median(|r| r.max_us);
    let boot = median(|r| r.boot_us);
    let ups = median(|r| r.ups as f64);
    println!("SMMU resume under QEMU (median of {RESUME_RUNS} runs, {ups:.0} power-ups each):");
    println!("  {:<34} {:>10}", "what", "us");
    println!("  {:<34} {:>10.0}", "resume, mean", mean);
    println!("  {:<34} {:>10.0}", "resume, worst", max);
    println!("  {:<34} {:>10.0}", "boot probe + reset (baseline)", boot);
    println!(
        "  resume / boot reset: {:.2}x mean, {:.2}x worst",
        mean / boot.max(1.0),
        max / boot.max(1.0)
    );
    let json = json_path("power-resume");
    let runs: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"power_ups\": {}, \"resume_mean_us\": {}, \"resume_max_us\": {}, \"boot_reset_us\": {}}}",
                r.ups, r.mean_us, r.max_us, r.boot_us
            )
        })
        .collect();
    std::fs::write(
        &json,
        format!(
            "{{\"bench\": \"power-resume\", \"runs\": [{}], \"median\": {{\"resume_mean_us\": {mean}, \"resume_max_us\": {max}, \"boot_reset_us\": {boot}, \"ratio_mean_to_boot\": {}}}}}\n",
            runs.join(", "),
            mean / boot.max(1.0)
        ),
    )?;
    println!("xtask: power-resume results: {}", util::rel(&json));
    Ok(())
}

/// The resume numbers of one run.
#[derive(Debug, PartialEq)]
struct Resume {
    ups: u64,
    mean_us: f64,
    max_us: f64,
    boot_us: f64,
}

/// Reads `N power-ups`, `resume mean A us / max B us (boot reset C us)` from the hypervisor's
/// `SMMU power:` line.
fn parse_resume(line: &str) -> Option<Resume> {
    let before = |label: &str| -> Option<f64> {
        let at = line.find(label)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    let after = |label: &str| -> Option<f64> {
        let at = line.find(label)? + label.len();
        line[at..].split_whitespace().next()?.parse().ok()
    };
    Some(Resume {
        ups: before(" power-ups")? as u64,
        mean_us: after("resume mean")?,
        max_us: after("/ max")?,
        boot_us: after("(boot reset")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_benches() {
        assert_eq!(
            select(&[]).unwrap(),
            vec!["stage2", "cmdq", "power", "linux"]
        );
        assert_eq!(select(&["linux".into()]).unwrap(), vec!["linux"]);
        assert_eq!(select(&["cmdq".into()]).unwrap(), vec!["cmdq"]);
        assert_eq!(
            select(&["stage2".into(), "stage2".into()]).unwrap(),
            vec!["stage2"]
        );
        let e = select(&["nope".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown benchmark \"nope\""), "{e}");
    }

    #[test]
    fn cli_parses_bench() {
        use clap::Parser;
        let cli = crate::Cli::try_parse_from(["xtask", "bench", "stage2"]).unwrap();
        assert!(matches!(cli.cmd, crate::Cmd::Bench { names } if names == ["stage2"]));
        let cli = crate::Cli::try_parse_from(["xtask", "bench"]).unwrap();
        assert!(matches!(cli.cmd, crate::Cmd::Bench { names } if names.is_empty()));
    }

    #[test]
    fn parses_the_power_line() {
        let line = "hyp: SMMU power: 101 power-ups, 100 power-downs, 3 ms off, 100 TLBIs skipped while off, resume mean 40 us / max 90 us (boot reset 300 us), 0 power-on errors, 0 power-off errors, now Suspended";
        assert_eq!(
            parse_resume(line),
            Some(Resume {
                ups: 101,
                mean_us: 40.0,
                max_us: 90.0,
                boot_us: 300.0
            })
        );
        assert_eq!(parse_resume("hyp: SMMU power: nothing"), None);
    }

    #[test]
    fn json_location() {
        assert_eq!(json_env("stage2"), "STAGE2_BENCH_JSON");
        assert!(json_path("stage2").ends_with("bench/stage2.json"));
    }
}
