//! `cargo xtask`: builds, runs and tests the hypervisor.
//!
//! Boards are described by `boards/<board>/board.toml` (see `board.rs` and the README); xtask
//! validates the board file, builds the guests it names, generates the Rust config the
//! hypervisor is built with, builds and objcopies the hypervisor, and runs it under QEMU.

mod bench;
mod board;
mod ci;
mod codegen;
mod cpio;
mod fdt;
mod image;
mod linux;
mod linux_bench;
mod qemu;
mod systest;
mod util;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::image::Profile;
use crate::qemu::RunOptions;

/// Build, run and test the aarch64 EL2 hypervisor.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the bootable image for a board: guests, generated config, hypervisor, objcopy.
    ///
    /// The image is written to target/images/<board>/hyp.bin (ELF with symbols beside it, as
    /// hyp.elf).
    Build {
        #[command(flatten)]
        board: BoardArgs,
        #[command(flatten)]
        profile: ProfileArgs,
    },
    /// Build, then boot the image under QEMU with the console on this terminal.
    ///
    /// Exits with QEMU's exit status, which is the hypervisor's semihosting exit status:
    /// 0 every VM powered off, 1 a VM asked for reset, 2 a guest died of an unhandled
    /// exception, 3 hypervisor panic, 4 fatal boot error. Quit QEMU with Ctrl-A X.
    Run {
        #[command(flatten)]
        board: BoardArgs,
        #[command(flatten)]
        profile: ProfileArgs,
        /// Number of CPUs to give QEMU (default: the board's qemu.smp).
        #[arg(long)]
        smp: Option<u32>,
        /// Start QEMU halted with a GDB server on localhost:1234 (-s -S).
        #[arg(long)]
        gdb: bool,
        /// Kill QEMU after this many seconds; 0 = never. Default 120, or never with --gdb or
        /// --guest linux.
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Run everything CI runs, stopping at the first failure: cargo fmt --check, clippy (host
    /// and bare-metal targets), unit tests, then the QEMU system tests.
    ///
    /// Ends with the line `xtask: N passed, M failed` and a non-zero exit status on any
    /// failure. QEMU (>= 10.0) is installed on Debian when missing and running as root.
    Test {
        /// Only the host checks (fmt, clippy, unit tests), no QEMU.
        #[arg(long, conflicts_with = "qemu_only")]
        no_qemu: bool,
        /// Only the QEMU system tests.
        #[arg(long)]
        qemu_only: bool,
        /// Per-test QEMU timeout in seconds (default: each test's own, 120; 300 for linux).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Long randomised runs too (the emulated SMMU's isolation test with 10^7 steps instead
        /// of 10^5).
        #[arg(long)]
        long: bool,
        /// System tests to run (default: all): smp, power, abort, panic, bad-dtb, no-el2,
        /// linux.
        scenarios: Vec<String>,
    },
    /// Run clippy with warnings denied: host crates, the hypervisor target and the guests.
    Clippy,
    /// Format every crate with rustfmt.
    Fmt {
        /// Only check; fail if anything would change.
        #[arg(long)]
        check: bool,
    },
    /// Run the benchmarks and write their results as JSON.
    ///
    /// Prints a table per benchmark and the path of its JSON (target/bench/<name>.json).
    /// stage2, cmdq and power are host benchmarks (release build); linux boots Debian's kernel
    /// under QEMU, alternately under the hypervisor and bare, and compares boot time and disk
    /// read throughput (env: LINUX_BENCH_RUNS=<n per side, default 3>,
    /// LINUX_BENCH_ONLY=hyp|bare, LINUX_BENCH_TIMEOUT=<s per boot, default 300>).
    Bench {
        /// Benchmarks to run (default: all): stage2, cmdq, power, linux.
        names: Vec<String>,
    },
    /// Validate a board file and print the Rust config generated from it.
    Config {
        #[command(flatten)]
        board: BoardArgs,
    },
}

#[derive(Args)]
struct BoardArgs {
    /// Board: a folder under boards/ holding board.toml.
    #[arg(long, default_value = "qemu-virt")]
    board: String,
    /// Use this guest (a crate under guests/) as every VM's payload. `linux` instead turns
    /// qemu-virt into its Linux variant: Debian's arm64 kernel with a busybox initramfs in vm0
    /// (CPUs 0-1, 512M, a virtio-blk disk behind the SMMU), the selftest guest in vm1.
    #[arg(long, value_name = "NAME")]
    guest: Option<String>,
    /// With --guest linux: what the initramfs's /init does (default: shell).
    #[arg(long, value_enum, value_name = "MODE")]
    linux_mode: Option<linux::Mode>,
}

impl BoardArgs {
    /// Whether this selects the Linux variant.
    fn linux(&self) -> bool {
        self.guest.as_deref() == Some(board::LINUX_PAYLOAD)
    }
}

#[derive(Args)]
struct ProfileArgs {
    /// Build with the release profile (the default).
    #[arg(long, conflicts_with = "debug")]
    release: bool,
    /// Build with the dev profile (unoptimised).
    #[arg(long)]
    debug: bool,
}

impl ProfileArgs {
    fn profile(&self) -> Profile {
        if self.debug {
            Profile::Debug
        } else {
            Profile::Release
        }
    }
}

/// Loads, adjusts and validates a board.
fn load_board(args: &BoardArgs, smp: Option<u32>) -> Result<(board::Board, String)> {
    let root = util::root();
    let (mut file, source) = board::load(&root, &args.board)?;
    if args.linux_mode.is_some() && !args.linux() {
        anyhow::bail!("--linux-mode needs --guest linux");
    }
    match &args.guest {
        Some(_) if args.linux() => {
            linux::variant(&mut file, args.linux_mode.unwrap_or(linux::Mode::Shell))?
        }
        Some(g) => file.set_payload(g),
        None => {}
    }
    if let Some(n) = smp {
        file.set_smp(n)?;
    }
    let board = file.validate(&source, &root.join("guests"))?;
    Ok((board, source))
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Build { board, profile } => {
            let (b, source) = load_board(&board, None)?;
            image::build(&b, &source, "hyp", profile.profile())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run {
            board,
            profile,
            smp,
            gdb,
            timeout,
        } => {
            let (b, source) = load_board(&board, smp)?;
            let qemu = qemu::find()?;
            let image = image::build(&b, &source, "hyp", profile.profile())?;
            let mut cmd = qemu::command(&qemu, &b, &image.bin)?;
            if gdb {
                cmd.args(["-s", "-S"]);
                // QEMU loads an arm64 Image 2 MiB into RAM; the image is linked at 0 and
                // relocates itself, so GDB needs the symbols at that offset.
                let load = b.ram.first().map_or(0, |r| r.pa) + (2 << 20);
                println!(
                    "QEMU is halted, waiting for GDB on localhost:1234. In another terminal:\n    \
                     gdb-multiarch -ex 'add-symbol-file {} -o {load:#x}' -ex 'target remote localhost:1234'",
                    util::rel(&image.elf)
                );
            }
            // A Linux shell waits for its user.
            let secs = timeout.unwrap_or(if gdb || board.linux() { 0 } else { 120 });
            let outcome = qemu::run(
                cmd,
                &RunOptions {
                    timeout: (secs > 0).then(|| Duration::from_secs(secs)),
                    prefix: None,
                    interactive: true,
                    echo: true,
                },
            )?;
            eprintln!(
                "QEMU exited with status {} ({}) after {:.1} s",
                outcome.code,
                systest::status_meaning(outcome.code),
                outcome.duration.as_secs_f64()
            );
            Ok(ExitCode::from(outcome.code.clamp(0, 255) as u8))
        }
        Cmd::Test {
            no_qemu,
            qemu_only,
            timeout,
            long,
            scenarios,
        } => {
            let plan = ci::TestPlan {
                host: !qemu_only,
                qemu: !no_qemu,
                only: scenarios,
                timeout: timeout.map(Duration::from_secs),
                long,
            };
            Ok(if ci::test(&plan)? {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Clippy => {
            ci::clippy()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fmt { check } => {
            ci::fmt(check)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Bench { names } => {
            bench::run(&names)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Config { board } => {
            let (b, source) = load_board(&board, None)?;
            let payloads = image::payload_paths(&b, Profile::Release);
            print!("{}", codegen::generate(&b, &source, &payloads)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_run_flags() {
        let cli = Cli::try_parse_from([
            "xtask",
            "run",
            "--board",
            "qemu-virt",
            "--guest",
            "selftest",
            "--smp",
            "2",
            "--gdb",
            "--timeout",
            "0",
            "--debug",
        ])
        .unwrap();
        let Cmd::Run {
            board,
            profile,
            smp,
            gdb,
            timeout,
        } = cli.cmd
        else {
            panic!("not run");
        };
        assert_eq!(board.guest.as_deref(), Some("selftest"));
        assert_eq!(profile.profile(), Profile::Debug);
        assert_eq!((smp, gdb, timeout), (Some(2), true, Some(0)));
        assert!(Cli::try_parse_from(["xtask", "build", "--release", "--debug"]).is_err());
    }

    #[test]
    fn guest_linux_selects_the_variant() {
        let cli = Cli::try_parse_from(["xtask", "run", "--guest", "linux"]).unwrap();
        let Cmd::Run { board, .. } = cli.cmd else {
            panic!("not run");
        };
        assert!(board.linux());
        let (b, _) = load_board(&board, None).unwrap();
        assert_eq!(b.vms[0].name, "linux");
        assert_eq!(b.vms[0].payload, "linux");
        assert!(
            b.vms[0]
                .bootargs
                .as_deref()
                .unwrap()
                .contains("linuxtest.mode=shell")
        );
        assert_eq!(b.vms[1].payload, "selftest");

        let cli =
            Cli::try_parse_from(["xtask", "build", "--guest", "linux", "--linux-mode", "test"])
                .unwrap();
        let Cmd::Build { board, .. } = cli.cmd else {
            panic!("not build");
        };
        let (b, _) = load_board(&board, None).unwrap();
        assert!(
            b.vms[0]
                .bootargs
                .as_deref()
                .unwrap()
                .contains("linuxtest.mode=test")
        );

        // Other guests replace every payload, as before; --linux-mode needs --guest linux.
        let cli = Cli::try_parse_from(["xtask", "build", "--guest", "selftest"]).unwrap();
        let Cmd::Build { board, .. } = cli.cmd else {
            panic!("not build");
        };
        let (b, _) = load_board(&board, None).unwrap();
        assert!(b.vms.iter().all(|v| v.payload == "selftest"));
        let cli = Cli::try_parse_from(["xtask", "build", "--linux-mode", "bench"]).unwrap();
        let Cmd::Build { board, .. } = cli.cmd else {
            panic!("not build");
        };
        let e = load_board(&board, None).unwrap_err().to_string();
        assert!(e.contains("--linux-mode needs --guest linux"), "{e}");
    }
}
