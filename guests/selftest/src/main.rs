//! `selftest`: a small EL1 guest that checks what the hypervisor offers
//! (DT, PSCI/SMCCC, SMP, RAM, FP/SIMD state, MMIO emulation, stage-2 aborts)
//! and prints one marker line per check:
//!
//! ```text
//! selftest: start (vcpus=N, ram=0x...+0x..., bootargs="...")
//! selftest: PASS <name>  |  selftest: FAIL <name>: <reason>
//! selftest: ALL PASS (<n> checks)     -> PSCI SYSTEM_OFF
//! selftest: <k> FAILED                -> PSCI SYSTEM_RESET
//! selftest: PANIC: <message> at <file>:<line>          -> SYSTEM_RESET
//! selftest: UNEXPECTED EXCEPTION esr=0x.. far=0x.. elr=0x..  -> SYSTEM_RESET
//! ```
//!
//! Bootargs (`/chosen/bootargs`, whitespace separated):
//! * `selftest.tests=all` (default): the standard checks;
//! * `selftest.tests=abort`: the standard checks plus the abort checks;
//! * `selftest.tests=dma`, or `selftest.dma` with any of the above: the
//!   standard checks plus the DMA checks (`dma.rs`: an SMMUv3 and QEMU's
//!   `edu` PCI device, which must be given with
//!   `-device edu,dma_mask=0xffffffffffffffff`), then the hostile-guest SMMU
//!   checks (`hostile.rs`), then `gic-hostile` (`gic_hostile.rs`: nonsense
//!   written to the GIC reaches only the VM's own interrupts; skipped with
//!   `selftest.bare`), then `smmu-irq` (`smmu_irq.rs`: the SMMU's
//!   interrupts through the GIC). When the DT has an emulated power controller
//!   (`hyp,gdsc-controller`), its domain 0 (the edu) is voted on first;
//! * `selftest.power`: the DMA checks (as `selftest.dma`) and then
//!   `smmu-power-cycle` (`power.rs`): the SMMU is powered off and on through
//!   the power controller's votes, with DMA and a stage-1 remap while it is
//!   off, 100 times; fails without a power controller in the DT;
//! * `selftest.power.cycles=N` (implies `selftest.power`): `N` cycles
//!   (1..=100000) instead of 100;
//! * `selftest.panic`: panic right after the banner (a guest panic must fail
//!   the run);
//! * `selftest.bare`: running without the hypervisor (smoke test on bare
//!   QEMU, whose built-in PSCI lacks SMCCC_VERSION and where `smc` is
//!   undefined): skips the `smccc-version` and `psci-smc` checks, and the
//!   part of the DMA checks that needs a hypervisor.
//!
//! Smoke test on bare QEMU (no hypervisor; the guest itself runs at EL1 and
//! QEMU implements PSCI over `hvc`). QEMU loads an Image at RAM base + 2 MiB,
//! so link it there (see `build.rs`):
//!
//! ```text
//! SELFTEST_LINK_BASE=0x40200000 cargo build -p selftest --target aarch64-unknown-none --release
//! llvm-objcopy -O binary target/aarch64-unknown-none/release/selftest selftest.bin
//! qemu-system-aarch64 -M virt,gic-version=3 -cpu max -smp 4 -m 128M -nographic \
//!     -no-reboot -kernel selftest.bin -append selftest.bare
//! ```
//!
//! `ALL PASS` then SYSTEM_OFF makes QEMU exit with status 0. The DMA checks on
//! bare QEMU (the guest programs QEMU's own SMMUv3):
//!
//! ```text
//! qemu-system-aarch64 -M virt,gic-version=3,iommu=smmuv3 -cpu max -smp 2 -m 1G \
//!     -nographic -no-reboot -kernel selftest.bin \
//!     -append 'selftest.bare selftest.tests=dma' \
//!     -device edu,dma_mask=0xffffffffffffffff,addr=01.0
//! ```

#![cfg_attr(selftest_guest, no_std, no_main)]

#[cfg(selftest_guest)]
mod arch;
#[cfg(selftest_guest)]
mod boot;
#[cfg(selftest_guest)]
mod checks;
#[cfg(selftest_guest)]
mod console;
#[cfg(selftest_guest)]
mod dma;
#[cfg(selftest_guest)]
mod dt;
#[cfg(selftest_guest)]
mod edu;
#[cfg(selftest_guest)]
mod exception;
#[cfg(selftest_guest)]
mod gic;
#[cfg(selftest_guest)]
mod gic_hostile;
#[cfg(selftest_guest)]
mod hostile;
#[cfg(selftest_guest)]
mod pci;
#[cfg(selftest_guest)]
mod power;
#[cfg(selftest_guest)]
mod psci;
#[cfg(selftest_guest)]
mod remap;
#[cfg(selftest_guest)]
mod report;
#[cfg(selftest_guest)]
mod smmu;
#[cfg(selftest_guest)]
mod smmu_irq;

#[cfg(selftest_guest)]
mod guest {
    use core::panic::PanicInfo;

    use crate::console::println;
    use crate::remap;
    use crate::report::{Msg, Report};
    use crate::{boot, checks, dma, dt, psci};

    /// What the bootargs ask for.
    #[derive(Default)]
    struct Config<'a> {
        aborts: bool,
        /// The DMA checks (SMMUv3 + edu).
        dma: bool,
        /// `smmu-power-cycle` (after the DMA checks).
        power: bool,
        /// Its number of cycles.
        power_cycles: u32,
        panic: bool,
        bare: bool,
        /// An unknown `selftest.tests=` value.
        bad_tests: Option<&'a str>,
        /// A `selftest.power.cycles=` value that is not a number in range.
        bad_cycles: Option<&'a str>,
    }

    impl<'a> Config<'a> {
        fn parse(bootargs: &'a str) -> Self {
            let mut cfg = Config {
                power_cycles: crate::power::DEFAULT_CYCLES,
                ..Config::default()
            };
            for word in bootargs.split_ascii_whitespace() {
                if let Some(tests) = word.strip_prefix("selftest.tests=") {
                    match tests {
                        "all" => cfg.aborts = false,
                        "abort" => cfg.aborts = true,
                        "dma" => cfg.dma = true,
                        other => cfg.bad_tests = Some(other),
                    }
                } else if word == "selftest.dma" {
                    cfg.dma = true;
                } else if word == "selftest.power" {
                    cfg.dma = true;
                    cfg.power = true;
                } else if let Some(n) = word.strip_prefix("selftest.power.cycles=") {
                    cfg.dma = true;
                    cfg.power = true;
                    match n.parse() {
                        Ok(n @ 1..=crate::power::MAX_CYCLES) => cfg.power_cycles = n,
                        _ => cfg.bad_cycles = Some(n),
                    }
                } else if word == "selftest.panic" {
                    cfg.panic = true;
                } else if word == "selftest.bare" {
                    cfg.bare = true;
                }
            }
            cfg
        }
    }

    /// Rust entry of vCPU 0 (from `boot.rs`: .bss zeroed, stack and MMU set
    /// up), with the DTB address.
    #[unsafe(no_mangle)]
    extern "C" fn selftest_main(dtb: usize) -> ! {
        let dt = dt::parse(dtb, boot::image_range());
        let (ncpus, (ram_base, ram_size), bootargs) = match &dt {
            Ok(dt) => (dt.ncpus, dt.ram.unwrap_or((0, 0)), dt.bootargs),
            Err(_) => (0, (0, 0), ""),
        };
        println!(
            "selftest: start (vcpus={ncpus}, ram={ram_base:#x}+{ram_size:#x}, bootargs=\"{bootargs}\")"
        );
        let cfg = Config::parse(bootargs);
        if cfg.panic {
            panic!("deliberate panic requested by selftest.panic");
        }

        let mut report = Report::new();
        if let Some(bad) = cfg.bad_tests {
            report.record(
                "bootargs",
                Err(Msg::new(format_args!(
                    "unknown selftest.tests={bad} (want all, abort or dma)"
                ))),
            );
        }
        if let Some(bad) = cfg.bad_cycles {
            report.record(
                "bootargs",
                Err(Msg::new(format_args!(
                    "bad selftest.power.cycles={bad} (want 1..={}); running {}",
                    crate::power::MAX_CYCLES,
                    cfg.power_cycles
                ))),
            );
        }
        report.record("dtb", checks::dtb(&dt));
        report.record("psci-version", checks::psci_version());
        if cfg.bare {
            report.skip("smccc-version", "selftest.bare");
        } else {
            report.record("smccc-version", checks::smccc_version());
        }
        report.record("smccc-unknown", checks::smccc_unknown());
        report.record("psci-features", checks::psci_features());
        if cfg.bare {
            report.skip("psci-smc", "selftest.bare");
        } else {
            report.record("psci-smc", checks::psci_smc());
        }
        match &dt {
            Ok(dt) => {
                report.record("smp", checks::smp(dt));
                report.record("memory", checks::memory(dt));
                match remap::stage2_remap(dt) {
                    Ok(true) => report.record("stage2-remap", Ok(())),
                    Ok(false) => report.skip("stage2-remap", "no hypervisor test hypercalls"),
                    Err(e) => report.record("stage2-remap", Err(e)),
                }
            }
            Err(_) => {
                let no_dt = || Err(Msg::new(format_args!("no usable DT")));
                report.record("smp", no_dt());
                report.record("memory", no_dt());
            }
        }
        report.record("fpsimd", checks::fpsimd());
        report.record("mmio-emul", checks::mmio_emul());
        if cfg.aborts {
            checks::aborts(&mut report, dt.as_ref().ok());
        }
        if cfg.dma {
            let power_cycles = cfg.power.then_some(cfg.power_cycles);
            dma::run(&mut report, dt.as_ref().ok(), cfg.bare, power_cycles);
        }
        report.finish()
    }

    #[panic_handler]
    fn panic(info: &PanicInfo<'_>) -> ! {
        match info.location() {
            Some(at) => println!(
                "selftest: PANIC: {} at {}:{}",
                info.message(),
                at.file(),
                at.line()
            ),
            None => println!("selftest: PANIC: {} at <unknown>:0", info.message()),
        }
        psci::system_reset()
    }
}

/// Host builds (e.g. `cargo build --workspace`) get a stub: the guest only
/// exists for `--target aarch64-unknown-none`.
#[cfg(not(selftest_guest))]
fn main() {
    eprintln!("selftest is an EL1 guest: build it with --target aarch64-unknown-none");
    std::process::exit(1);
}
