//! `cargo xtask bench linux`: what the hypervisor costs a real guest. Boots Debian's kernel with
//! our initramfs in its benchmark mode (`linuxtest.mode=bench`: time a sequential O_DIRECT read
//! of the virtio-blk disk, then power off) on the same QEMU machine two ways, alternately:
//!
//! - `hyp`: the hypervisor with the Linux variant of `qemu-virt` (`linux::variant`), Linux in
//!   vm0 on CPUs 0-1 behind the emulated SMMU and no other VM (`LINUX_BENCH_BESIDE=1` keeps the
//!   selftest guest in vm1 beside it: under TCG its emulated CPUs then take host cores from
//!   Linux's, which measures the host, not the hypervisor);
//! - `bare`: the same QEMU command line (machine with `virtualization=on` and the SMMU, `-smp`,
//!   `-m`, the same devices and disk) with the kernel booted directly: `-kernel <Image> -initrd
//!   <initramfs> -append "<the VM's bootargs> maxcpus=2"`, so it runs on two CPUs like the VM.
//!
//! Per run it reads the boot time (QEMU start to the `LINUX-INIT` line, wall clock, as xtask read
//! the console) and the read throughput (`LINUX-READ bytes=<n> ns=<t>`, the guest's own clock).
//! It prints the median and spread per side and the hyp/bare ratios against the targets (boot
//! at most 1.15x, read throughput at least 0.8x of bare), and writes `target/bench/linux.json`.
//!
//! Environment: `LINUX_BENCH_RUNS` (runs per side, default 3), `LINUX_BENCH_ONLY` (`hyp` or
//! `bare`: only that side, no ratios), `LINUX_BENCH_BESIDE=1` (vm1 runs beside Linux),
//! `LINUX_BENCH_TIMEOUT` (seconds per boot, default 300),
//! `LINUX_BENCH_JSON` (where the JSON goes).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::bench;
use crate::board;
use crate::image::{self, Profile};
use crate::linux::{self, Mode};
use crate::qemu::{self, Outcome, RunOptions};
use crate::systest;
use crate::util::{self, rel};

/// Runs per side unless `LINUX_BENCH_RUNS` says otherwise.
pub const DEFAULT_RUNS: usize = 3;
/// Seconds one boot may take unless `LINUX_BENCH_TIMEOUT` says otherwise.
pub const DEFAULT_TIMEOUT_SECS: u64 = 300;
/// Target: boot under the hypervisor at most this many times bare.
pub const BOOT_TARGET: f64 = 1.15;
/// Target: read throughput under the hypervisor at least this fraction of bare.
pub const READ_TARGET: f64 = 0.8;
/// Added to the bare kernel's command line: as many CPUs as the VM has.
pub const BARE_EXTRA_ARGS: &str = "maxcpus=2";

/// How the kernel is booted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// In vm0 under the hypervisor.
    Hyp,
    /// Directly by QEMU.
    Bare,
}

impl Side {
    pub fn name(self) -> &'static str {
        match self {
            Side::Hyp => "hyp",
            Side::Bare => "bare",
        }
    }
}

/// `LINUX_BENCH_ONLY`: `None` for both sides.
pub fn parse_only(v: Option<&str>) -> Result<Option<Side>> {
    match v.map(str::trim) {
        None | Some("") => Ok(None),
        Some("hyp") => Ok(Some(Side::Hyp)),
        Some("bare") => Ok(Some(Side::Bare)),
        Some(o) => bail!("LINUX_BENCH_ONLY={o:?}: expected \"hyp\" or \"bare\""),
    }
}

/// `LINUX_BENCH_RUNS`: at least 1.
pub fn parse_runs(v: Option<&str>) -> Result<usize> {
    match v.map(str::trim) {
        None | Some("") => Ok(DEFAULT_RUNS),
        Some(t) => match t.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => bail!("LINUX_BENCH_RUNS={t:?}: expected a number of runs, at least 1"),
        },
    }
}

/// The order of the runs: hyp, bare, hyp, bare, ... (`runs` each), so that a change in the
/// machine's load hits both sides alike; only one side with `only`.
pub fn schedule(runs: usize, only: Option<Side>) -> Vec<Side> {
    (0..runs)
        .flat_map(|_| [Side::Hyp, Side::Bare])
        .filter(|s| only.is_none_or(|o| o == *s))
        .collect()
}

/// `LINUX-READ bytes=<n> ns=<t>` anywhere in `line`: (bytes, ns).
pub fn parse_read(line: &str) -> Option<(u64, u64)> {
    let rest = &line[line.find("LINUX-READ ")? + "LINUX-READ ".len()..];
    let field = |key: &str| -> Option<u64> {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(key))?
            .parse()
            .ok()
    };
    let (bytes, ns) = (field("bytes=")?, field("ns=")?);
    (bytes > 0 && ns > 0).then_some((bytes, ns))
}

/// What one run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// QEMU start to the `LINUX-INIT` line, seconds.
    pub boot_s: f64,
    pub read_bytes: u64,
    pub read_ns: u64,
    /// QEMU start to its exit, seconds.
    pub total_s: f64,
}

impl Sample {
    /// Read throughput in MiB/s.
    pub fn read_mib_s(&self) -> f64 {
        self.read_bytes as f64 / (1u64 << 20) as f64 / (self.read_ns as f64 / 1e9)
    }
}

/// Reads one run's numbers; `Err` says why the run does not count.
pub fn sample(o: &Outcome) -> Result<Sample, String> {
    if let Some(l) = o.lines.iter().find(|l| l.text.contains("LINUX-FAIL")) {
        return Err(format!("the guest failed: {:?}", l.text.trim()));
    }
    if o.timed_out {
        return Err(format!("timed out after {:.0} s", o.duration.as_secs_f64()));
    }
    let boot = o
        .first_at("LINUX-INIT")
        .ok_or("no `LINUX-INIT` line: Linux never reached /init")?;
    let (read_bytes, read_ns) = o
        .lines
        .iter()
        .find_map(|l| parse_read(&l.text))
        .ok_or("no `LINUX-READ bytes=<n> ns=<t>` line")?;
    if o.code != 0 {
        return Err(format!(
            "exit status {} ({})",
            o.code,
            systest::status_meaning(o.code)
        ));
    }
    Ok(Sample {
        boot_s: boot.as_secs_f64(),
        read_bytes,
        read_ns,
        total_s: o.duration.as_secs_f64(),
    })
}

/// Median (the upper one of an even count, like the host benchmarks).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (max - min) / median: large when something else was running.
pub fn spread(v: &[f64]) -> f64 {
    let max = v.iter().copied().fold(f64::MIN, f64::max);
    let min = v.iter().copied().fold(f64::MAX, f64::min);
    (max - min) / median(v)
}

/// The hyp/bare ratios of the medians and whether they meet the targets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ratios {
    /// Boot time, hyp / bare (lower is better; target at most [`BOOT_TARGET`]).
    pub boot: f64,
    /// Read throughput, hyp / bare (higher is better; target at least [`READ_TARGET`]).
    pub read: f64,
}

impl Ratios {
    pub fn new(hyp: &[Sample], bare: &[Sample]) -> Option<Ratios> {
        if hyp.is_empty() || bare.is_empty() {
            return None;
        }
        let boot = |s: &[Sample]| median(&s.iter().map(|x| x.boot_s).collect::<Vec<_>>());
        let read = |s: &[Sample]| median(&s.iter().map(Sample::read_mib_s).collect::<Vec<_>>());
        Some(Ratios {
            boot: boot(hyp) / boot(bare),
            read: read(hyp) / read(bare),
        })
    }

    pub fn boot_ok(&self) -> bool {
        self.boot <= BOOT_TARGET
    }

    pub fn read_ok(&self) -> bool {
        self.read >= READ_TARGET
    }
}

/// The table, one row per side that ran, and the ratio line.
pub fn table(hyp: &[Sample], bare: &[Sample]) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<5} {:>5} {:>9} {:>7} {:>12} {:>7} {:>9}",
        "side", "runs", "boot s", "spread", "read MiB/s", "spread", "total s"
    );
    for (side, s) in [(Side::Hyp, hyp), (Side::Bare, bare)] {
        if s.is_empty() {
            continue;
        }
        let boot: Vec<f64> = s.iter().map(|x| x.boot_s).collect();
        let read: Vec<f64> = s.iter().map(Sample::read_mib_s).collect();
        let total: Vec<f64> = s.iter().map(|x| x.total_s).collect();
        let _ = writeln!(
            t,
            "{:<5} {:>5} {:>9.2} {:>6.0}% {:>12.1} {:>6.0}% {:>9.2}",
            side.name(),
            s.len(),
            median(&boot),
            spread(&boot) * 100.0,
            median(&read),
            spread(&read) * 100.0,
            median(&total)
        );
    }
    match Ratios::new(hyp, bare) {
        Some(r) => {
            let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
            let _ = writeln!(
                t,
                "hyp/bare: boot {:.2}x (target <= {BOOT_TARGET:.2}x: {}), read throughput {:.2}x \
                 (target >= {READ_TARGET:.2}x: {})",
                r.boot,
                verdict(r.boot_ok()),
                r.read,
                verdict(r.read_ok())
            );
        }
        None => t.push_str("hyp/bare: not compared (only one side ran)\n"),
    }
    t
}

/// The JSON written to `target/bench/linux.json`.
pub fn json(
    hyp: &[Sample],
    bare: &[Sample],
    kernel: &str,
    runs: usize,
    load: Option<f64>,
) -> String {
    let num = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.4}"));
    let list = |v: Vec<f64>| {
        v.iter()
            .map(|x| format!("{x:.4}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut j = String::from("{\n  \"benchmark\": \"linux\",\n");
    let _ = writeln!(j, "  \"kernel\": {kernel:?},");
    let _ = writeln!(j, "  \"runs_per_side\": {runs},");
    let _ = writeln!(j, "  \"bare_extra_args\": {BARE_EXTRA_ARGS:?},");
    let _ = writeln!(
        j,
        "  \"host_cpus\": {},",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let _ = writeln!(j, "  \"load_average_before\": {},", num(load));
    j += "  \"results\": [\n";
    let sides: Vec<(Side, &[Sample])> = [(Side::Hyp, hyp), (Side::Bare, bare)]
        .into_iter()
        .filter(|(_, s)| !s.is_empty())
        .collect();
    for (i, (side, s)) in sides.iter().enumerate() {
        let boot: Vec<f64> = s.iter().map(|x| x.boot_s).collect();
        let read: Vec<f64> = s.iter().map(Sample::read_mib_s).collect();
        let total: Vec<f64> = s.iter().map(|x| x.total_s).collect();
        let _ = write!(
            j,
            "    {{\"side\": \"{}\", \"boot_s\": {:.4}, \"boot_spread\": {:.4}, \"boot_reps\": [{}], \
             \"read_mib_per_s\": {:.4}, \"read_spread\": {:.4}, \"read_reps\": [{}], \
             \"read_bytes\": {}, \"total_s_reps\": [{}]}}",
            side.name(),
            median(&boot),
            spread(&boot),
            list(boot.clone()),
            median(&read),
            spread(&read),
            list(read.clone()),
            s[0].read_bytes,
            list(total)
        );
        j += if i + 1 < sides.len() { ",\n" } else { "\n" };
    }
    j += "  ],\n";
    let r = Ratios::new(hyp, bare);
    let ok = |v: Option<bool>| v.map_or("null".to_string(), |b| b.to_string());
    let _ = writeln!(
        j,
        "  \"ratios\": {{\"boot_hyp_over_bare\": {}, \"boot_target_max\": {BOOT_TARGET}, \
         \"boot_met\": {}, \"read_hyp_over_bare\": {}, \"read_target_min\": {READ_TARGET}, \
         \"read_met\": {}}}",
        num(r.map(|r| r.boot)),
        ok(r.map(|r| r.boot_ok())),
        num(r.map(|r| r.read)),
        ok(r.map(|r| r.read_ok()))
    );
    j += "}\n";
    j
}

/// The 1-minute load average (Linux), to judge how quiet the machine was.
fn load_average() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// `cargo xtask bench linux`.
pub fn run() -> Result<()> {
    let env = |k: &str| std::env::var(k).ok();
    let runs = parse_runs(env("LINUX_BENCH_RUNS").as_deref())?;
    let only = parse_only(env("LINUX_BENCH_ONLY").as_deref())?;
    let secs = match env("LINUX_BENCH_TIMEOUT") {
        Some(t) => t
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|&t| t > 0)
            .with_context(|| format!("LINUX_BENCH_TIMEOUT={t:?}: expected seconds"))?,
        None => DEFAULT_TIMEOUT_SECS,
    };
    let qemu = qemu::find()?;

    let root = util::root();
    let (mut file, source) = board::load(&root, systest::BOARD)?;
    linux::variant(&mut file, Mode::Bench)?;
    let beside = env("LINUX_BENCH_BESIDE").is_some_and(|v| v == "1");
    if !beside {
        // Linux alone, as bare: a second VM's emulated CPUs would compete with Linux's for the
        // host's cores, which costs nothing on hardware where each VM has its own CPUs.
        file.vm.truncate(1);
    }
    let board = file.validate(&source, &root.join("guests"))?;
    let payload = linux::payload(&linux::default_cache())?;
    let image = match only {
        Some(Side::Bare) => None,
        _ => Some(image::build(
            &board,
            &source,
            "bench-linux",
            Profile::Release,
        )?),
    };
    let bootargs = board.vms[0]
        .bootargs
        .clone()
        .context("the Linux VM has no bootargs")?;
    let bare_append = format!("{bootargs} {BARE_EXTRA_ARGS}");

    let load = load_average();
    let plan = schedule(runs, only);
    println!(
        "linux bench: {} boot(s) of {} ({}), {} s timeout each, load average {} before",
        plan.len(),
        payload.packages.release,
        plan.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
        secs,
        load.map_or("unknown".into(), |l| format!("{l:.2}"))
    );
    let (mut hyp, mut bare) = (Vec::new(), Vec::new());
    for (i, side) in plan.iter().enumerate() {
        let cmd: Command = match (side, &image) {
            (Side::Hyp, Some(img)) => qemu::command(&qemu, &board, &img.bin)?,
            (Side::Hyp, None) => unreachable!("the hyp side is built unless only bare runs"),
            (Side::Bare, _) => {
                let mut c = qemu::machine_command(&qemu, &board)?;
                c.arg("-kernel")
                    .arg(&payload.packages.image)
                    .arg("-initrd")
                    .arg(&payload.initrd)
                    .args(["-append", &bare_append]);
                c
            }
        };
        let outcome = qemu::run(
            cmd,
            &RunOptions {
                timeout: Some(Duration::from_secs(secs)),
                prefix: None,
                interactive: false,
                echo: false,
            },
        )?;
        match sample(&outcome) {
            Ok(s) => {
                println!(
                    "linux bench: run {}/{} {}: boot {:.2} s, read {:.1} MiB/s ({} bytes in {:.3} s), \
                     QEMU ran {:.2} s",
                    i + 1,
                    plan.len(),
                    side.name(),
                    s.boot_s,
                    s.read_mib_s(),
                    s.read_bytes,
                    s.read_ns as f64 / 1e9,
                    s.total_s
                );
                match side {
                    Side::Hyp => hyp.push(s),
                    Side::Bare => bare.push(s),
                }
            }
            Err(why) => {
                eprintln!("--- last lines of the {} run ---", side.name());
                for l in outcome
                    .output
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .iter()
                    .rev()
                {
                    eprintln!("    {}", l.trim_end());
                }
                bail!("linux bench: run {} ({}) failed: {why}", i + 1, side.name());
            }
        }
    }
    println!(
        "\nLinux {} under QEMU, {} run(s) per side, median; boot = QEMU start to LINUX-INIT \
         (wall clock), read = sequential O_DIRECT read of the virtio-blk disk (guest clock):",
        payload.packages.release, runs
    );
    print!("{}", table(&hyp, &bare));
    let path = std::env::var_os(bench::json_env("linux"))
        .map_or_else(|| bench::json_path("linux"), PathBuf::from);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(
        &path,
        json(&hyp, &bare, &payload.packages.release, runs, load),
    )
    .with_context(|| format!("writing {}", path.display()))?;
    println!("xtask: linux results: {}", rel(&path));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::Line;

    fn s(boot_s: f64, mib_s: f64) -> Sample {
        let bytes = 32 << 20;
        Sample {
            boot_s,
            read_bytes: bytes,
            read_ns: (bytes as f64 / (mib_s * (1u64 << 20) as f64) * 1e9).round() as u64,
            total_s: boot_s + 1.0,
        }
    }

    #[test]
    fn env_parsing_and_schedule() {
        assert_eq!(parse_runs(None).unwrap(), 3);
        assert_eq!(parse_runs(Some("5")).unwrap(), 5);
        assert!(parse_runs(Some("0")).is_err());
        assert!(parse_runs(Some("x")).is_err());
        assert_eq!(parse_only(None).unwrap(), None);
        assert_eq!(parse_only(Some("bare")).unwrap(), Some(Side::Bare));
        assert!(parse_only(Some("both")).is_err());
        use Side::{Bare, Hyp};
        assert_eq!(schedule(2, None), [Hyp, Bare, Hyp, Bare]);
        assert_eq!(schedule(3, Some(Bare)), [Bare, Bare, Bare]);
        assert_eq!(schedule(1, Some(Hyp)), [Hyp]);
    }

    #[test]
    fn read_lines() {
        assert_eq!(
            parse_read("[linux] LINUX-READ bytes=33554432 ns=1250000000\r"),
            Some((33554432, 1_250_000_000))
        );
        assert_eq!(
            parse_read("LINUX-READ ns=5 bytes=7"),
            Some((7, 5)),
            "order does not matter"
        );
        assert_eq!(parse_read("LINUX-READ bytes=1"), None);
        assert_eq!(parse_read("LINUX-READ bytes=0 ns=5"), None);
        assert_eq!(parse_read("LINUX-READ bytes=x ns=5"), None);
        assert_eq!(parse_read("LINUX-INIT release=6.1"), None);
        let one = Sample {
            boot_s: 1.0,
            read_bytes: 64 << 20,
            read_ns: 2_000_000_000,
            total_s: 2.0,
        };
        assert!((one.read_mib_s() - 32.0).abs() < 1e-9);
    }

    fn outcome(lines: &[(u64, &str)], code: i32) -> Outcome {
        Outcome {
            code,
            output: lines.iter().map(|(_, t)| format!("{t}\n")).collect(),
            lines: lines
                .iter()
                .map(|&(ms, t)| Line {
                    at: Duration::from_millis(ms),
                    text: t.into(),
                })
                .collect(),
            duration: Duration::from_secs(20),
            timed_out: false,
        }
    }

    #[test]
    fn samples_from_runs() {
        let good = [
            (900, "hyp: hyp 0.1.0 starting"),
            (
                12_500,
                "[linux] LINUX-INIT release=6.1.0-56-arm64 mode=bench",
            ),
            (14_000, "[linux] LINUX-READ bytes=33554432 ns=500000000"),
        ];
        let s = sample(&outcome(&good, 0)).unwrap();
        assert_eq!(s.boot_s, 12.5);
        assert_eq!((s.read_bytes, s.read_ns), (32 << 20, 500_000_000));
        assert_eq!(s.total_s, 20.0);
        assert!((s.read_mib_s() - 64.0).abs() < 1e-9);

        assert!(
            sample(&outcome(&good, 1))
                .unwrap_err()
                .contains("exit status 1")
        );
        let mut fail = good.to_vec();
        fail.push((15_000, "[linux] LINUX-FAIL reading /dev/vda: I/O error"));
        assert!(
            sample(&outcome(&fail, 0))
                .unwrap_err()
                .contains("I/O error")
        );
        assert!(
            sample(&outcome(&good[..2], 0))
                .unwrap_err()
                .contains("LINUX-READ")
        );
        assert!(
            sample(&outcome(&good[2..], 0))
                .unwrap_err()
                .contains("LINUX-INIT")
        );
        let mut t = outcome(&good, 124);
        t.timed_out = true;
        assert!(sample(&t).unwrap_err().contains("timed out"));
    }

    #[test]
    fn ratio_math() {
        let hyp = [s(11.0, 80.0), s(10.0, 90.0), s(30.0, 85.0)];
        let bare = [s(10.0, 100.0), s(9.0, 95.0), s(10.0, 110.0)];
        let r = Ratios::new(&hyp, &bare).unwrap();
        // Medians: hyp boot 11, bare boot 10; hyp read 85, bare read 100.
        assert!((r.boot - 1.1).abs() < 1e-9, "{r:?}");
        assert!((r.read - 0.85).abs() < 1e-6, "{r:?}");
        assert!(r.boot_ok() && r.read_ok());
        let slow = Ratios {
            boot: 1.16,
            read: 0.79,
        };
        assert!(!slow.boot_ok() && !slow.read_ok());
        assert!(Ratios::new(&hyp, &[]).is_none());
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!((spread(&[9.0, 10.0, 11.0]) - 0.2).abs() < 1e-9);
    }

    #[test]
    fn table_and_json() {
        let hyp = [s(11.0, 80.0), s(10.0, 90.0), s(12.0, 85.0)];
        let bare = [s(10.0, 100.0), s(9.0, 95.0), s(10.0, 110.0)];
        let t = table(&hyp, &bare);
        assert!(
            t.contains("hyp/bare: boot 1.10x (target <= 1.15x: met)"),
            "{t}"
        );
        assert!(
            t.contains("read throughput 0.85x (target >= 0.80x: met)"),
            "{t}"
        );
        assert_eq!(t.lines().filter(|l| l.starts_with("hyp ")).count(), 1);
        let j = json(&hyp, &bare, "6.1.0-56-arm64", 3, Some(0.5));
        assert!(j.contains("\"benchmark\": \"linux\""));
        assert!(j.contains("\"side\": \"hyp\", \"boot_s\": 11.0000"));
        assert!(j.contains("\"boot_hyp_over_bare\": 1.1000"));
        assert!(j.contains("\"read_met\": true"));
        assert!(j.contains("\"load_average_before\": 0.5000"));
        assert_eq!(j.matches('{').count(), j.matches('}').count());
        assert_eq!(j.matches('[').count(), j.matches(']').count());

        // Only the bare side: no ratios.
        let t = table(&[], &bare);
        assert!(t.contains("not compared"), "{t}");
        assert!(!t.contains("\nhyp "));
        let j = json(&[], &bare, "k", 3, None);
        assert!(j.contains("\"boot_hyp_over_bare\": null"));
        assert!(j.contains("\"boot_met\": null"));
        assert!(j.contains("\"load_average_before\": null"));
        assert!(!j.contains("\"side\": \"hyp\""));
    }
}
