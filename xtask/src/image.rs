//! Building a bootable image for a board: guests, generated config, hypervisor, objcopy.
//!
//! Layout under `target/images/`:
//! - `guests/<payload>.bin` (`<payload>-debug.bin` for `--debug`): raw guest images (the
//!   `linux` payload is Debian's kernel Image and the initramfs under `target/linux/`, see
//!   `linux.rs`);
//! - `<board>/<variant>.config.rs`: the generated config (`HYP_BOARD_CONFIG`);
//! - `<board>/<variant>.elf` and `<board>/<variant>.bin`: the hypervisor ELF (for GDB) and the
//!   bootable arm64 Image. The variant is `hyp` for `cargo xtask build`/`run` and
//!   `test-<scenario>` for the system tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::board::{Board, LINUX_PAYLOAD};
use crate::codegen::{self, Payload};
use crate::linux;
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

/// Builds every payload the board names and returns payload name → its files: the guest crates
/// (objcopied to raw images) and, for `linux`, the fetched kernel and the initramfs (checked to
/// fit each Linux VM's first memory region).
pub fn build_payloads(board: &Board, profile: Profile) -> Result<BTreeMap<String, Payload>> {
    let mut names: Vec<&str> = board.vms.iter().map(|v| v.payload.as_str()).collect();
    names.sort();
    names.dedup();
    let mut map = BTreeMap::new();
    if names.contains(&LINUX_PAYLOAD) {
        let p = linux::payload(&linux::default_cache())?;
        let kernel = linux::image_size(&p.packages.image)?;
        let initrd = std::fs::metadata(&p.initrd)?.len();
        for vm in board.vms.iter().filter(|v| v.payload == LINUX_PAYLOAD) {
            linux::check_fits(vm, kernel, initrd)?;
        }
        map.insert(
            LINUX_PAYLOAD.to_owned(),
            Payload {
                image: p.packages.image,
                initrd: Some(p.initrd),
            },
        );
    }
    names.retain(|n| *n != LINUX_PAYLOAD);
    if names.is_empty() {
        return Ok(map);
    }
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
        map.insert(n.to_owned(), Payload::image(bin));
    }
    Ok(map)
}

/// Where [`build_payloads`] puts each payload, without building anything (for `cargo xtask
/// config`). The `linux` payload is named by the cache's paths once fetched, else by where the
/// Image will be.
pub fn payload_paths(board: &Board, profile: Profile) -> BTreeMap<String, Payload> {
    board
        .vms
        .iter()
        .map(|v| {
            let p = if v.payload == LINUX_PAYLOAD {
                let cache = linux::default_cache();
                Payload {
                    image: linux::cached_image(&cache).unwrap_or_else(|| cache.join("Image")),
                    initrd: Some(cache.join("initramfs.cpio")),
                }
            } else {
                Payload::image(images_dir().join("guests").join(format!(
                    "{}{}.bin",
                    v.payload,
                    profile.suffix()
                )))
            };
            (v.payload.clone(), p)
        })
        .collect()
}

/// Where QEMU puts an arm64 Image (`-kernel`): 2 MiB into RAM.
pub const QEMU_LOAD_OFFSET: u64 = 2 << 20;

/// Checks that the hypervisor image as QEMU loads it, plus its pool (2 MiB aligned after the
/// image), ends below the DTB and inside the board's reserved range. QEMU's `virt` puts the DTB
/// at RAM + min(RAM / 2, 128 MiB) when no initrd is given (after the image if the image reaches
/// past that, where the pool would then collide with it). `image_size` is the image's memory
/// footprint (header field `image_size`: file, `.bss` and boot stack).
pub fn check_qemu_layout(board: &Board, image_size: u64) -> Result<()> {
    let (Some(q), Some(ram)) = (&board.qemu, board.ram.first()) else {
        return Ok(());
    };
    let base = ram.pa + QEMU_LOAD_OFFSET;
    let pool_end = (base + image_size).next_multiple_of(2 << 20) + board.hyp_pool;
    let dtb = ram.pa + (q.memory / 2).min(128 << 20);
    if pool_end > dtb {
        bail!(
            "the hypervisor image ({}) at {base:#x} and its {} pool end at {pool_end:#x}, past \
             where QEMU puts the DTB ({dtb:#x}): make the image or board.hyp_pool smaller",
            human(image_size),
            human(board.hyp_pool)
        );
    }
    let covered = board
        .reserved
        .iter()
        .any(|r| r.pa <= base && pool_end <= r.pa + r.size);
    if !board.reserved.is_empty() && !covered {
        bail!(
            "the hypervisor image ({}) at {base:#x} and its pool end at {pool_end:#x}, outside \
             board.reserved: VM memory could be placed over them",
            human(image_size)
        );
    }
    Ok(())
}

/// Writes the generated config for `variant` and returns its path.
pub fn write_config(
    board: &Board,
    source: &str,
    variant: &str,
    payloads: &BTreeMap<String, Payload>,
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
    let payloads = build_payloads(board, profile)?;
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
    if linux::is_arm64_image(&std::fs::read(&bin)?) {
        check_qemu_layout(board, linux::image_size(&bin)?)?;
    } else {
        eprintln!(
            "warning: {} has no arm64 Image header (\"ARM\\x64\" at 0x38); QEMU will not load it at 0x4020_0000",
            rel(&bin)
        );
    }
    println!("image: {} ({}, {size} bytes)", rel(&bin), human(size));
    Ok(Image { bin, elf })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::board::{Exit, PhysRange, Qemu};

    fn qemu_board(hyp_pool: u64) -> Board {
        Board {
            name: "qemu-virt".into(),
            exit: Exit::Semihosting,
            early_console: None,
            hyp_pool,
            ram: vec![PhysRange {
                pa: 0x4000_0000,
                size: 1 << 30,
            }],
            reserved: vec![PhysRange {
                pa: 0x4000_0000,
                size: 256 << 20,
            }],
            qemu: Some(Qemu {
                machine: "virt".into(),
                cpu: "max".into(),
                smp: 4,
                memory: 1 << 30,
                devices: vec![],
                disks: vec![],
            }),
            smmu_power: None,
            vms: vec![],
        }
    }

    #[test]
    fn qemu_layout() {
        let b = qemu_board(32 << 20);
        // The Linux variant: hypervisor + Debian's Image (~33 MB) + initramfs (~2 MB).
        check_qemu_layout(&b, 36 << 20).unwrap();
        // 0x4020_0000 + 94M = 0x4600_0000, + 32M pool = 0x4800_0000: exactly up to the DTB.
        check_qemu_layout(&b, 94 << 20).unwrap();
        let e = check_qemu_layout(&b, (94 << 20) + 4096)
            .unwrap_err()
            .to_string();
        assert!(e.contains("DTB (0x48000000)"), "{e}");
        let mut small = qemu_board(32 << 20);
        small.reserved[0].size = 64 << 20;
        let e = check_qemu_layout(&small, 36 << 20).unwrap_err().to_string();
        assert!(e.contains("outside board.reserved"), "{e}");
        let mut hw = qemu_board(32 << 20);
        hw.qemu = None;
        check_qemu_layout(&hw, 1 << 30).unwrap();
    }
}
