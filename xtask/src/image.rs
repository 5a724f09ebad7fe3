//! Building a bootable image for a board: guests, generated config, hypervisor, objcopy.
//!
//! Layout under `target/images/`:
//! - `guests/<payload>.bin` (`<payload>-debug.bin` for `--debug`): raw guest images;
//! - `<board>/<variant>.config.rs`: the generated config (`HYP_BOARD_CONFIG`);
//! - `<board>/<variant>.elf` and `<board>/<variant>.bin`: the hypervisor ELF (for GDB) and the
//!   bootable arm64 Image. The variant is `hyp` for `cargo xtask build`/`run` and
//!   `test-<scenario>` for the system tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::board::Board;
use crate::codegen;
use crate::util::{self, cargo, human, rel};

/// Target of the hypervisor (softfloat: hypervisor code never touches the guest's FP/SIMD).
pub const HYP_TARGET: &str = "aarch64-unknown-none-softfloat";
/// Target of the guests.
pub const GUEST_TARGET: &str = "aarch64-unknown-none";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Release,
    Debug,
}

impl Profile {
    /// Cargo's output folder name.
    pub fn dir(self) -> &'static str {
        match self {
            Profile::Release => "release",
            Profile::Debug => "debug",
        }
    }

    fn add_flag(self, cmd: &mut std::process::Command) {
        if self == Profile::Release {
            cmd.arg("--release");
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Profile::Release => "",
            Profile::Debug => "-debug",
        }
    }
}

/// A built hypervisor image.
#[derive(Clone, Debug)]
pub struct Image {
    /// Bootable raw arm64 Image (QEMU `-kernel`).
    pub bin: PathBuf,
    /// The ELF with symbols, for GDB.
    pub elf: PathBuf,
}

/// `target/images`.
pub fn images_dir() -> PathBuf {
    util::target_dir().join("images")
}

/// The `llvm-objcopy` of the toolchain's llvm-tools component.
pub fn objcopy() -> Result<PathBuf> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let run = |args: &[&str]| {
        let mut c = std::process::Command::new(&rustc);
        c.args(args).current_dir(util::root());
        util::output(&mut c)
    };
    let sysroot = run(&["--print", "sysroot"])?;
    let vv = run(&["-vV"])?;
    let host = vv
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("`rustc -vV` printed no host triple")?;
    let path = Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host.trim())
        .join("bin/llvm-objcopy");
    if !path.is_file() {
        bail!(
            "{} not found: install the llvm-tools component (`rustup component add llvm-tools`; \
             rust-toolchain.toml lists it, so a fresh rustup install adds it)",
            path.display()
        );
    }
    Ok(path)
}

/// `llvm-objcopy -O binary elf bin`, replacing `bin` only when its bytes change so cargo does
/// not see a new mtime for an `include_bytes!` input that did not really change.
fn to_binary(objcopy: &Path, elf: &Path, bin: &Path) -> Result<u64> {
    let dir = bin.parent().context("binary path has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = bin.with_extension("bin.tmp");
    let mut cmd = std::process::Command::new(objcopy);
    cmd.args(["-O", "binary"]).arg(elf).arg(&tmp);
    util::output(&mut cmd)?;
    let new = std::fs::read(&tmp).with_context(|| format!("reading {}", tmp.display()))?;
    if new.is_empty() {
        bail!("{} is empty after objcopy", rel(&tmp));
    }
    if std::fs::read(bin).is_ok_and(|old| old == new) {
        std::fs::remove_file(&tmp)?;
    } else {
        std::fs::rename(&tmp, bin)
            .with_context(|| format!("renaming {} to {}", tmp.display(), bin.display()))?;
    }
    Ok(new.len() as u64)
}

/// Builds every payload the board names and returns payload name → raw image.
pub fn build_guests(board: &Board, profile: Profile) -> Result<BTreeMap<String, PathBuf>> {
    let mut names: Vec<&str> = board.vms.iter().map(|v| v.payload.as_str()).collect();
    names.sort();
    names.dedup();
    let mut cmd = cargo();
    cmd.arg("build");
    for n in &names {
        cmd.args(["-p", n]);
    }
    cmd.args(["--target", GUEST_TARGET]);
    profile.add_flag(&mut cmd);
    util::run(&mut cmd)?;
    let objcopy = objcopy()?;
    let out = util::target_dir().join(GUEST_TARGET).join(profile.dir());
    let mut map = BTreeMap::new();
    for n in names {
        let elf = out.join(n);
        if !elf.is_file() {
            bail!(
                "guest {n}: {} was not built (the guest crate's binary must be named like its folder)",
                rel(&elf)
            );
        }
        let bin = images_dir()
            .join("guests")
            .join(format!("{n}{}.bin", profile.suffix()));
        let size = to_binary(&objcopy, &elf, &bin)?;
        eprintln!("guest {n}: {} ({})", rel(&bin), human(size));
        map.insert(n.to_owned(), bin);
    }
    Ok(map)
}

/// Writes the generated config for `variant` and returns its path.
pub fn write_config(
    board: &Board,
    source: &str,
    variant: &str,
    payloads: &BTreeMap<String, PathBuf>,
) -> Result<PathBuf> {
    let text = codegen::generate(board, source, payloads)?;
    let path = images_dir()
        .join(&board.name)
        .join(format!("{variant}.config.rs"));
    codegen::write_if_changed(&path, &text)?;
    Ok(path)
}

/// Builds guests, config and hypervisor, and objcopies the image.
pub fn build(board: &Board, source: &str, variant: &str, profile: Profile) -> Result<Image> {
    let payloads = build_guests(board, profile)?;
    let config = write_config(board, source, variant, &payloads)?;
    eprintln!("config: {}", rel(&config));

    let mut cmd = cargo();
    cmd.args(["build", "-p", "hyp", "--bin", "hyp", "--target", HYP_TARGET]);
    profile.add_flag(&mut cmd);
    cmd.env("HYP_BOARD_CONFIG", &config);
    util::run(&mut cmd)?;

    let built = util::target_dir()
        .join(HYP_TARGET)
        .join(profile.dir())
        .join("hyp");
    let dir = images_dir().join(&board.name);
    let elf = dir.join(format!("{variant}.elf"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::copy(&built, &elf)
        .with_context(|| format!("copying {} to {}", built.display(), elf.display()))?;
    let bin = dir.join(format!("{variant}.bin"));
    let size = to_binary(&objcopy()?, &elf, &bin)?;
    let head = std::fs::read(&bin)?;
    if head.get(0x38..0x3c) != Some(b"ARM\x64".as_slice()) {
        eprintln!(
            "warning: {} has no arm64 Image header (\"ARM\\x64\" at 0x38); QEMU will not load it at 0x4020_0000",
            rel(&bin)
        );
    }
    println!("image: {} ({}, {size} bytes)", rel(&bin), human(size));
    Ok(Image { bin, elf })
}
