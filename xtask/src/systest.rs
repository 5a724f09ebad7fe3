//! QEMU system tests: each scenario takes the `qemu-virt` board, changes it in code (no copied
//! board files), builds its own image (`target/images/qemu-virt/test-<name>.bin`), boots it and
//! checks console markers and QEMU's exit status (the semihosting exit status of the hypervisor).
//! The `linux` scenario uses the Linux variant of the board (`linux::variant`): Debian's kernel
//! in vm0 with a virtio-blk disk behind the emulated SMMU, the selftest guest in vm1.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::board::{self, BoardFile};
use crate::fdt;
use crate::image::{self, Profile};
use crate::linux::{self, Mode};
use crate::qemu::{self, Outcome, RunOptions};
use crate::util::{self, rel};

/// The board the system tests run on.
pub const BOARD: &str = "qemu-virt";
/// How long a scenario may run unless it says otherwise (or `--timeout` does).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// One system test.
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    /// Changes the board before it is validated and built.
    setup: fn(&mut BoardFile) -> Result<()>,
    /// Boot with QEMU's own DTB after cutting the GIC node's `reg` to one pair.
    bad_dtb: bool,
    /// Checks a finished run; records every failed expectation.
    check: fn(&mut Checks),
    /// QEMU is killed after this long (`cargo xtask test --timeout` overrides it).
    pub timeout: Duration,
}

/// The DMA, SMMU and GIC checks the `smp` test requires of both VMs, at once (separate CPUs and
/// edus): DMA through each VM's emulated SMMU; what a hostile guest writes to its SMMU is
/// contained, reported as hardware would, and its DMA works again afterwards; whatever it writes
/// to its virtual GIC (every SPI register, reserved offsets, other redistributors, SGIs to
/// foreign affinities) touches only its own interrupts, which `smmu-irq` (the emulated SMMU's
/// event queue, GERROR and CMD_SYNC interrupts through the virtual GIC) then proves by needing
/// the hypervisor's own SMMU interrupt.
const SMP_DMA_CHECKS: [&str; 12] = [
    "dma-s1",
    "dma-unmap",
    "dma-bypass",
    "dma-bypass-isolation",
    "smmu-foreign-sid",
    "smmu-bad-ste",
    "smmu-cd-outside",
    "smmu-strtab-locked",
    "smmu-garbage-cmdq",
    "dma-after-hostile",
    "gic-hostile",
    "smmu-irq",
];

/// All scenarios, in the order they run.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "smp",
        about: "default board with -smp 4: both VMs pass every selftest check (including live \
                stage-2 unmap/remap through the test hypercalls) and power off",
        setup: |b| b.set_smp(4),
        bad_dtb: false,
        check: |c| {
            c.contains("[vm0] selftest: ALL PASS");
            c.contains("[vm1] selftest: ALL PASS");
            c.contains("[vm0] selftest: PASS stage2-remap");
            c.contains("[vm1] selftest: PASS stage2-remap");
            for check in SMP_DMA_CHECKS {
                c.contains(&format!("[vm0] selftest: PASS {check}"));
                c.contains(&format!("[vm1] selftest: PASS {check}"));
            }
            c.contains("vSMMU traps:");
            // The SMMU's runtime PM reports its counters (vm0 votes its edu on, vm1's is
            // active through Bus Master Enable).
            c.contains("hyp: SMMU power:");
            c.number_at_least("hyp: SMMU power:", "power-on errors", 0, 0);
            c.absent("FAIL");
            c.status(0);
        },
        timeout: DEFAULT_TIMEOUT,
    },
    Scenario {
        name: "power",
        about: "vm0 power-cycles the SMMU 100 times through its emulated GDSC vote: DMA works when \
                on and does not land when off, stage-1 changes made while off (TLBIs skipped) are \
                used after power-up; vm1 runs its DMA checks beside it",
        setup: |b| b.set_bootargs(0, "selftest.tests=dma selftest.power"),
        bad_dtb: false,
        check: |c| {
            c.contains("[vm0] selftest: PASS smmu-power-cycle");
            c.contains("[vm0] selftest: ALL PASS");
            c.contains("[vm1] selftest: ALL PASS");
            c.contains("[vm1] selftest: PASS dma-after-hostile");
            c.contains("[vm1] selftest: PASS smmu-irq");
            // The hypervisor's own counters agree with what the guest saw.
            c.number_at_least("hyp: SMMU power:", "power-downs", 100, u64::MAX);
            c.number_at_least("hyp: SMMU power:", "power-ups", 100, u64::MAX);
            c.number_at_least("hyp: SMMU power:", "TLBIs skipped", 100, u64::MAX);
            c.number_at_least("hyp: SMMU power:", "power-on errors", 0, 0);
            c.number_at_least("hyp: SMMU power:", "power-off errors", 0, 0);
            c.absent("FAIL");
            c.status(0);
        },
        timeout: DEFAULT_TIMEOUT,
    },
    Scenario {
        name: "abort",
        about: "vm0 touches unmapped IPAs and must get aborts injected; the image stays intact",
        setup: |b| b.set_bootargs(0, "selftest.tests=abort"),
        bad_dtb: false,
        check: |c| {
            c.contains("[vm0] selftest: ALL PASS");
            c.line_with(
                &["[vm0] selftest: PASS abort-"],
                "an abort- check passing in vm0",
            );
            c.contains("hyp: injected abort");
            c.contains("hyp: image integrity OK");
            c.absent("FAIL");
            c.status(0);
        },
        timeout: DEFAULT_TIMEOUT,
    },
    Scenario {
        name: "panic",
        about: "vm0 panics: the run ends with a non-zero status",
        setup: |b| b.set_bootargs(0, "selftest.panic"),
        bad_dtb: false,
        check: |c| {
            c.contains("[vm0] selftest: PANIC");
            c.status_nonzero();
        },
        timeout: DEFAULT_TIMEOUT,
    },
    Scenario {
        name: "bad-dtb",
        about: "QEMU's DTB with the GIC reg cut to one pair: the hypervisor refuses to boot (status 4)",
        setup: |_| Ok(()),
        bad_dtb: true,
        check: |c| {
            c.line_with(
                &["hyp: fatal: bad device tree", "intc"],
                "`hyp: fatal: bad device tree` naming the intc node",
            );
            c.status(4);
        },
        timeout: DEFAULT_TIMEOUT,
    },
    Scenario {
        name: "no-el2",
        about: "QEMU without virtualization=on enters the image at EL1: a clear error, status 4",
        setup: |b| b.set_machine("virt,gic-version=3,iommu=smmuv3"),
        bad_dtb: false,
        check: |c| {
            c.line_with(
                &["hyp: fatal: entered at EL1", "EL2 is not available"],
                "`hyp: fatal: entered at EL1 ... EL2 is not available`",
            );
            c.status(4);
        },
        timeout: DEFAULT_TIMEOUT,
    },
    Scenario {
        name: "linux",
        about: "the Linux variant: Debian's arm64 kernel boots in vm0 (2 vCPUs, 512M), probes its \
                emulated SMMUv3 with arm-smmu-v3 and writes, then reads back, a virtio-blk disk \
                whose DMA its own SMMU translates; vm1 passes its selftest beside it",
        setup: |b| linux::variant(b, Mode::Test),
        bad_dtb: false,
        check: |c| {
            c.contains("[linux] LINUX-INIT");
            c.line_with(
                &["[linux] LINUX-SMMU", "arm-smmu-v3"],
                "a `[linux] LINUX-SMMU` line from arm-smmu-v3",
            );
            c.line_with(
                &["[linux] LINUX-DISK", "type=DMA", "access_platform=1"],
                "`[linux] LINUX-DISK ... type=DMA ... access_platform=1` (the disk's DMA \
                 translated by the guest's SMMU)",
            );
            c.contains("[linux] LINUX-CHECK");
            c.contains("[linux] LINUX-PASS");
            c.contains("[vm1] selftest: ALL PASS");
            // The guest's SMMU driver went through the emulated SMMU and installed the disk's
            // STE.
            c.contains("hyp: linux: vSMMU traps:");
            c.number_at_least("hyp: linux: vSMMU traps:", "STEs installed", 1, u64::MAX);
            c.absent("LINUX-FAIL");
            c.absent("FAIL");
            c.status(0);
        },
        timeout: Duration::from_secs(300),
    },
];

/// Collects failed expectations about one run.
pub struct Checks<'a> {
    outcome: &'a Outcome,
    pub failures: Vec<String>,
}

impl<'a> Checks<'a> {
    pub fn new(outcome: &'a Outcome) -> Self {
        Checks {
            outcome,
            failures: Vec::new(),
        }
    }

    pub fn contains(&mut self, marker: &str) {
        if !self.outcome.output.contains(marker) {
            self.failures.push(format!("missing `{marker}`"));
        }
    }

    pub fn absent(&mut self, marker: &str) {
        if let Some(line) = self.outcome.output.lines().find(|l| l.contains(marker)) {
            self.failures
                .push(format!("unexpected `{marker}`: {:?}", line.trim_end()));
        }
    }

    /// The first line holding `marker` has `<n> <label>` with `min <= n <= max`.
    pub fn number_at_least(&mut self, marker: &str, label: &str, min: u64, max: u64) {
        let Some(line) = self.outcome.output.lines().find(|l| l.contains(marker)) else {
            self.failures.push(format!("missing `{marker}`"));
            return;
        };
        let n = line.find(&format!(" {label}")).and_then(|at| {
            let digits: String = line[..at]
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            digits.parse::<u64>().ok()
        });
        match n {
            Some(n) if (min..=max).contains(&n) => {}
            Some(n) => self.failures.push(format!(
                "`{marker}` line: {n} {label}, expected {min}..={max}"
            )),
            None => self
                .failures
                .push(format!("`{marker}` line has no `<n> {label}`: {line:?}")),
        }
    }

    /// Some line holds all of `parts`.
    pub fn line_with(&mut self, parts: &[&str], what: &str) {
        let found = self
            .outcome
            .output
            .lines()
            .any(|l| parts.iter().all(|p| l.contains(p)));
        if !found {
            self.failures.push(format!("missing {what}"));
        }
    }

    pub fn status(&mut self, want: i32) {
        if self.outcome.code != want {
            self.failures.push(format!(
                "exit status {} ({}), expected {want} ({})",
                self.outcome.code,
                status_meaning(self.outcome.code),
                status_meaning(want)
            ));
        }
    }

    pub fn status_nonzero(&mut self) {
        if self.outcome.code == 0 {
            self.failures
                .push("exit status 0, expected a failure status".to_owned());
        }
    }

    /// Expectations every scenario shares: no timeout, no hypervisor panic.
    fn common(&mut self) {
        if self.outcome.timed_out {
            self.failures.push(format!(
                "timed out after {:.0} s",
                self.outcome.duration.as_secs_f64()
            ));
        }
        self.absent("hyp: PANIC");
    }
}

/// What the hypervisor's semihosting exit statuses mean.
pub fn status_meaning(code: i32) -> &'static str {
    match code {
        0 => "every VM powered off",
        1 => "a VM asked for reset",
        2 => "a guest died of an unhandled exception",
        3 => "hypervisor panic",
        4 => "fatal boot error",
        124 => "timed out",
        137 => "killed",
        _ => "unknown",
    }
}

/// Builds one scenario's image and runs it under `timeout` (`None`: the scenario's own).
/// `Ok(failures)`; `Err` for build problems.
pub fn run(scenario: &Scenario, qemu: &Path, timeout: Option<Duration>) -> Result<Vec<String>> {
    let timeout = timeout.unwrap_or(scenario.timeout);
    run_outcome(scenario, qemu, timeout, true).map(|(_, failures)| failures)
}

/// Builds one scenario's image and runs it (echoing its console when `echo`): what happened and
/// the failed expectations.
pub fn run_outcome(
    scenario: &Scenario,
    qemu: &Path,
    timeout: Duration,
    echo: bool,
) -> Result<(Outcome, Vec<String>)> {
    let root = util::root();
    let (mut file, source) = board::load(&root, BOARD)?;
    (scenario.setup)(&mut file)?;
    let board = file.validate(&source, &root.join("guests"))?;
    let variant = format!("test-{}", scenario.name);
    let image = image::build(&board, &source, &variant, Profile::Release)?;
    let mut cmd = qemu::command(qemu, &board, &image.bin)?;
    if scenario.bad_dtb {
        let dir = image.bin.parent().context("image has no folder")?;
        let original = dir.join(format!("{variant}.qemu.dtb"));
        let _ = std::fs::remove_file(&original);
        qemu::dump_dtb(qemu, &board, &original)?;
        let blob = std::fs::read(&original)?;
        let (bad, node) = fdt::cut_gic_reg(blob)?;
        let bad_path = dir.join(format!("{variant}.dtb"));
        std::fs::write(&bad_path, bad)?;
        eprintln!("bad DTB: {} ({node} reg cut to one pair)", rel(&bad_path));
        cmd.arg("-dtb").arg(&bad_path);
    }
    let outcome = qemu::run(
        cmd,
        &RunOptions {
            timeout: Some(timeout),
            prefix: Some(format!("[{}] ", scenario.name)),
            interactive: false,
            echo,
        },
    )?;
    let mut checks = Checks::new(&outcome);
    checks.common();
    (scenario.check)(&mut checks);
    if !checks.failures.is_empty() {
        let tail: Vec<&str> = outcome.output.lines().rev().take(20).collect();
        eprintln!("--- last lines of {} output ---", scenario.name);
        for l in tail.iter().rev() {
            eprintln!("    {}", l.trim_end());
        }
    }
    let failures = checks.failures;
    Ok((outcome, failures))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(output: &str, code: i32) -> Outcome {
        Outcome {
            code,
            output: output.into(),
            duration: Duration::from_secs(1),
            ..Outcome::default()
        }
    }

    fn failures(name: &str, o: &Outcome) -> Vec<String> {
        let s = SCENARIOS.iter().find(|s| s.name == name).unwrap();
        let mut c = Checks::new(o);
        c.common();
        (s.check)(&mut c);
        c.failures
    }

    #[test]
    fn scenario_names_are_unique() {
        for (i, s) in SCENARIOS.iter().enumerate() {
            assert!(SCENARIOS[..i].iter().all(|o| o.name != s.name));
        }
    }

    #[test]
    fn smp_checks() {
        let dma: String = SMP_DMA_CHECKS
            .iter()
            .flat_map(|c| {
                [
                    format!("[vm0] selftest: PASS {c}\n"),
                    format!("[vm1] selftest: PASS {c}\n"),
                ]
            })
            .collect();
        let good = &(dma
            + "hyp: vm0: vSMMU traps: 1\nhyp: SMMU power: 1 power-ups, 0 power-on errors\n[vm0] selftest: PASS stage2-remap\r\n[vm1] selftest: PASS stage2-remap\r\n[vm0] selftest: ALL PASS (9 checks)\r\n[vm1] selftest: ALL PASS (9 checks)\r\nhyp: all VMs stopped, exit status 0\r\n");
        assert!(failures("smp", &outcome(good, 0)).is_empty());
        let f = failures("smp", &outcome(good, 1));
        assert!(f[0].contains("exit status 1"), "{f:?}");
        let bad = format!("{good}[vm1] selftest: FAIL timer: late\n");
        assert_eq!(failures("smp", &outcome(&bad, 0)).len(), 1);
        let f = failures("smp", &outcome("[vm0] selftest: ALL PASS (9 checks)\n", 0));
        assert!(
            f.contains(&"missing `[vm1] selftest: ALL PASS`".to_string()),
            "{f:?}"
        );
        let skipped = good.replace("PASS stage2-remap", "SKIP stage2-remap");
        assert_eq!(failures("smp", &outcome(&skipped, 0)).len(), 2);
        let mut t = outcome(good, 0);
        t.timed_out = true;
        assert!(failures("smp", &t)[0].contains("timed out"));
        assert!(!failures("smp", &outcome(&format!("{good}hyp: PANIC at x\n"), 0)).is_empty());
    }

    #[test]
    fn power_counters() {
        let line = "hyp: SMMU power: 101 power-ups, 100 power-downs, 3 ms off, 100 TLBIs skipped while off, resume last 40 us / max 90 us (boot reset 300 us), 0 power-on errors, 0 power-off errors, now Suspended\n";
        let pass = format!(
            "[vm0] selftest: PASS smmu-power-cycle\n[vm0] selftest: ALL PASS\n[vm1] selftest: PASS dma-after-hostile\n[vm1] selftest: PASS smmu-irq\n[vm1] selftest: ALL PASS\n{line}"
        );
        assert!(failures("power", &outcome(&pass, 0)).is_empty());
        let few = pass.replace("100 power-downs", "99 power-downs");
        assert_eq!(failures("power", &outcome(&few, 0)).len(), 1);
        let err = pass.replace("0 power-on errors", "2 power-on errors");
        assert_eq!(failures("power", &outcome(&err, 0)).len(), 1);
        let none = pass.replace(line, "");
        assert_eq!(failures("power", &outcome(&none, 0)).len(), 5);
    }

    #[test]
    fn abort_checks() {
        let good = "[vm0] selftest: PASS abort-read 0x1000\nhyp: injected abort\nhyp: image integrity OK\n[vm0] selftest: ALL PASS (3 checks)\n";
        assert!(failures("abort", &outcome(good, 0)).is_empty());
        let no_abort = good.replace("abort-read", "timer");
        assert_eq!(failures("abort", &outcome(&no_abort, 0)).len(), 1);
    }

    #[test]
    fn panic_checks() {
        let out = "[vm0] selftest: PANIC: boom at src/main.rs:1\n";
        assert!(failures("panic", &outcome(out, 1)).is_empty());
        assert_eq!(failures("panic", &outcome(out, 0)).len(), 1);
        assert_eq!(failures("panic", &outcome("", 1)).len(), 1);
    }

    #[test]
    fn bad_dtb_checks() {
        let out = "hyp: fatal: bad device tree: /intc@8000000: reg has 1 range, need 2\n";
        assert!(failures("bad-dtb", &outcome(out, 4)).is_empty());
        assert_eq!(failures("bad-dtb", &outcome(out, 0)).len(), 1);
        let other = "hyp: fatal: bad device tree: /cpus missing\n";
        assert_eq!(failures("bad-dtb", &outcome(other, 4)).len(), 1);
    }

    #[test]
    fn linux_checks() {
        let good = "hyp: VM \"linux\" (VMID 1): 2 vCPU(s)\n\
            [linux] [    0.000000] Booting Linux on physical CPU 0x0000000000 [0x000f0510]\n\
            [linux] LINUX-INIT release=6.1.0-56-arm64 mode=test\r\n\
            [linux] LINUX-SMMU [    0.412000] arm-smmu-v3 9050000.smmuv3: ias 44-bit, oas 44-bit (features 0x00008305)\r\n\
            [linux] LINUX-IOMMU group=0 type=DMA devices=0000:00:03.0\r\n\
            [linux] LINUX-DISK pci=0000:00:03.0 iommu_group=0 type=DMA access_platform=1\r\n\
            [linux] LINUX-CHECK bytes=8388608 sha256=ab12\r\n\
            [linux] LINUX-PASS\r\n\
            [linux] LINUX-READ bytes=8388608 ns=123456789\r\n\
            [vm1] selftest: ALL PASS (12 checks)\n\
            hyp: linux: vSMMU traps: 40 CMDQ_PROD writes, 40 CMDQ_CONS reads, 9 other reads, 12 other writes; 80 commands (30 forwarded, 0 rejected), 1 STEs installed, 0 events injected\n\
            hyp: vm1: vSMMU traps: 4 CMDQ_PROD writes, 4 CMDQ_CONS reads, 9 other reads, 12 other writes; 8 commands (3 forwarded, 0 rejected), 2 STEs installed, 0 events injected\n\
            hyp: all VMs stopped, exit status 0\n";
        assert_eq!(failures("linux", &outcome(good, 0)), Vec::<String>::new());
        let f = failures("linux", &outcome(good, 1));
        assert!(f[0].contains("exit status 1"), "{f:?}");

        // The disk's DMA bypassing the SMMU: identity domain, no ACCESS_PLATFORM.
        let bypass = good
            .replace(
                "type=DMA access_platform=1",
                "type=identity access_platform=0",
            )
            .replace(
                "[linux] LINUX-PASS",
                "[linux] LINUX-FAIL the disk's DMA is not translated",
            );
        let f = failures("linux", &outcome(&bypass, 1));
        assert!(f.iter().any(|x| x.contains("LINUX-DISK")), "{f:?}");
        assert!(
            f.iter().any(|x| x.contains("missing `[linux] LINUX-PASS`")),
            "{f:?}"
        );
        assert!(
            f.iter().any(|x| x.contains("unexpected `LINUX-FAIL`")),
            "{f:?}"
        );
        assert!(f.iter().any(|x| x.contains("unexpected `FAIL`")), "{f:?}");

        // No arm-smmu-v3 line (the guest found no SMMU), no STE installed, vm1 failing.
        let no_smmu = good.replace("arm-smmu-v3 9050000.smmuv3", "pci 0000:00:03.0");
        assert_eq!(failures("linux", &outcome(&no_smmu, 0)).len(), 1);
        let no_ste = good.replace(", 1 STEs installed", ", 0 STEs installed");
        let f = failures("linux", &outcome(&no_ste, 0));
        assert!(f.len() == 1 && f[0].contains("STEs installed"), "{f:?}");
        let vm1 = good.replace(
            "[vm1] selftest: ALL PASS (12 checks)",
            "[vm1] selftest: FAIL dma-s1",
        );
        assert_eq!(failures("linux", &outcome(&vm1, 0)).len(), 2);
        // Linux never reaching /init, or timing out, fails.
        let f = failures("linux", &outcome("[linux] Kernel panic - not syncing\n", 1));
        assert!(
            f.contains(&"missing `[linux] LINUX-INIT`".to_string()),
            "{f:?}"
        );
        let mut t = outcome(good, 124);
        t.timed_out = true;
        assert!(failures("linux", &t)[0].contains("timed out"));
        // The vm1 trap line alone does not stand in for the linux VM's.
        let no_linux_line = good.replace("hyp: linux: vSMMU", "hyp: other: vSMMU");
        assert_eq!(failures("linux", &outcome(&no_linux_line, 0)).len(), 2);
    }

    #[test]
    fn linux_scenario_has_a_longer_timeout() {
        let s = SCENARIOS.iter().find(|s| s.name == "linux").unwrap();
        assert_eq!(s.timeout, Duration::from_secs(300));
        assert!(
            SCENARIOS
                .iter()
                .filter(|s| s.name != "linux")
                .all(|s| s.timeout == DEFAULT_TIMEOUT)
        );
    }

    #[test]
    fn scenario_setups_validate() {
        let root = util::root();
        for s in SCENARIOS {
            let (mut file, source) = board::load(&root, BOARD).unwrap();
            (s.setup)(&mut file).unwrap();
            file.validate(&source, &root.join("guests")).unwrap();
        }
    }
}
