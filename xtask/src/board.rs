//! Board files: `boards/<board>/board.toml`.
//!
//! A board file is parsed in two steps. [`BoardFile`] is the file as written: every table rejects
//! keys it does not know, and sizes are kept as written (`"64M"` or an integer). Callers may then
//! change it in code (test scenarios replace bootargs, `--guest` replaces payloads, `--smp`
//! replaces the CPU count) before [`BoardFile::validate`] checks everything and resolves it into
//! a [`Board`], with plain numbers, that code generation and the QEMU runner use. Every error
//! names the file and the field path, e.g. `vm[1].memory[0].size`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Deserializer, de};

/// Smallest first memory region of a VM: it holds the guest DTB (at its start) and the payload
/// (2 MiB in).
pub const MIN_FIRST_REGION: u64 = 4 << 20;
/// Smallest hypervisor pool.
pub const MIN_HYP_POOL: u64 = 4 << 20;
/// Page size: every address and size must be a multiple of it.
pub const PAGE: u64 = 4 << 10;
/// The payload that is not a crate under `guests/`: Debian's arm64 kernel with the initramfs
/// `xtask/src/linux.rs` builds (embedded as the VM's initrd).
pub const LINUX_PAYLOAD: &str = "linux";
/// Sector size: a scratch disk's size must be a multiple of it.
const SECTOR: u64 = 512;

/// The board file as written (after parsing, before validation).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardFile {
    pub board: BoardSection,
    /// Present only for boards run under QEMU.
    pub qemu: Option<QemuSection>,
    /// The SMMU's power domain; absent: the SMMU stays powered.
    pub smmu_power: Option<SmmuPowerSection>,
    #[serde(default)]
    pub vm: Vec<VmSection>,
}

/// `[smmu_power]`: runtime PM of the SMMU.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmmuPowerSection {
    /// `"simulated"` (QEMU: off = SMMU disabled and its registers wiped) or `"gdsc"`.
    pub domain: String,
    /// Idle time before power-off, in ms (default 20, as Linux uses for SMMUs).
    pub autosuspend_ms: Option<u32>,
    /// The GDSC, for `domain = "gdsc"`.
    pub gdsc: Option<GdscSection>,
}

/// `gdsc = { name, base, size, gdscr, flags, clocks }`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GdscSection {
    pub name: String,
    /// Physical base of the clock controller.
    pub base: u64,
    /// Size of the clock controller's window.
    pub size: Size,
    /// GDSCR offset in the window.
    pub gdscr: u32,
    /// Any of "votable", "hw_ctrl", "poll_cfg_gdscr", "always_on", "retain_ff", "skip_collapse".
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub clocks: Vec<ClockSection>,
}

/// `{ name, cbcr, halt }`: a branch clock in the GDSC's clock controller.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockSection {
    pub name: String,
    pub cbcr: u32,
    /// "check" (default), "voted", "delay" or "skip".
    pub halt: Option<String>,
}

/// `[board]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoardSection {
    pub name: String,
    /// `"semihosting"` or `"psci"`.
    pub exit: String,
    /// Host-physical base of a PL011 the hypervisor prints on from its first instruction, before
    /// (and without) the device tree. Absent on boards without a PL011.
    pub early_console: Option<u64>,
    pub hyp_pool: Size,
    /// Host RAM banks. Every VM memory region must lie inside one of them. For a QEMU board there
    /// is exactly one bank and its size is what QEMU is given with `-m`.
    #[serde(default)]
    pub ram: Vec<Range>,
    /// Host-physical ranges no VM may be given (hypervisor image and pool, DTB, firmware).
    #[serde(default)]
    pub reserved: Vec<Range>,
}

/// `[qemu]`: how `cargo xtask run` starts QEMU for this board.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuSection {
    /// `-M` value.
    pub machine: String,
    /// `-cpu` value.
    pub cpu: String,
    /// `-smp` value: number of physical CPUs.
    pub smp: u32,
    /// Extra `-device` values (e.g. the PCI DMA masters the VMs own).
    #[serde(default)]
    pub devices: Vec<String>,
    /// Scratch disks: set in code by board variants (the Linux guest's virtio-blk disk), never
    /// read from a board file, because their paths are build outputs.
    #[serde(skip)]
    pub disks: Vec<Disk>,
}

/// A scratch disk image QEMU attaches: created fresh (zeroed, sparse) before every run by
/// [`crate::qemu::command`], and attached with `args` (`-drive ...`, `-device ...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disk {
    pub path: PathBuf,
    /// Bytes; a non-zero multiple of 512.
    pub size: u64,
    /// The QEMU arguments that attach it.
    pub args: Vec<String>,
}

/// `[[vm]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    pub name: String,
    pub cpus: Vec<u32>,
    /// A crate under `guests/`.
    pub payload: String,
    pub bootargs: Option<String>,
    /// IPA of the emulated PL011 console.
    pub console: Option<u64>,
    pub memory: Vec<Region>,
    #[serde(default)]
    pub devices: Vec<Region>,
    #[serde(default)]
    pub pci: Vec<String>,
    #[serde(default)]
    pub stream_ids: Vec<u32>,
    /// Offer the hypervisor's test hypercalls (stage-2 unmap/remap of the VM's own RAM).
    #[serde(default)]
    pub test_services: bool,
    /// IPA of the emulated power controller the VM votes through.
    pub power_controller: Option<u64>,
    /// PCI functions (of `pci`) whose activity is the guest's power vote (domain i = entry i).
    #[serde(default)]
    pub power_votes: Vec<String>,
}

/// `{ ipa, pa, size }`: a guest-physical window backed by host-physical memory or MMIO.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub ipa: u64,
    pub pa: u64,
    pub size: Size,
}

/// `{ pa, size }`: a host-physical range.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub pa: u64,
    pub size: Size,
}

/// A size as written: an integer (bytes) or a string such as `"64M"`, `"1G"`, `"4K"`, `"0x1000"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size: an integer number of bytes or a string like \"64M\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Size, E> {
                Ok(Size::Bytes(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Size, E> {
                u64::try_from(v)
                    .map(Size::Bytes)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Size, E> {
                Ok(Size::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl From<u64> for Size {
    fn from(v: u64) -> Self {
        Size::Bytes(v)
    }
}

impl From<&str> for Size {
    fn from(v: &str) -> Self {
        Size::Text(v.to_owned())
    }
}

/// Parses `"64M"`, `"1G"`, `"4K"`, `"4096"`, `"0x1000"` (underscores allowed) into bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim().replace('_', "");
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (&t[..], 0),
    };
    let value = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16)
    } else {
        digits.parse::<u64>()
    }
    .map_err(|_| {
        format!("{text:?} is not a size (write bytes, or a number with K, M, G or T, e.g. \"64M\")")
    })?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} does not fit in 64 bits"))
}

impl Size {
    fn resolve(&self) -> Result<u64, String> {
        match self {
            Size::Bytes(b) => Ok(*b),
            Size::Text(t) => parse_size(t),
        }
    }
}

/// How the hypervisor ends a run (mirrors `hyp::config::ExitMethod`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Semihosting,
    Psci,
}

/// A validated board with every size resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Board {
    pub name: String,
    pub exit: Exit,
    pub early_console: Option<u64>,
    pub hyp_pool: u64,
    pub ram: Vec<PhysRange>,
    pub reserved: Vec<PhysRange>,
    pub qemu: Option<Qemu>,
    pub smmu_power: Option<SmmuPower>,
    pub vms: Vec<Vm>,
}

/// Validated `[smmu_power]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmmuPower {
    pub autosuspend_ms: u32,
    /// `None`: simulated.
    pub gdsc: Option<Gdsc>,
}

/// GDSC flag names and their `power::gdsc::GdscFlags` bits.
pub const GDSC_FLAGS: &[(&str, u32)] = &[
    ("votable", 1 << 0),
    ("hw_ctrl", 1 << 2),
    ("poll_cfg_gdscr", 1 << 5),
    ("always_on", 1 << 6),
    ("retain_ff", 1 << 7),
    ("skip_collapse", 1 << 10),
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gdsc {
    pub name: String,
    pub base: u64,
    pub size: u64,
    pub gdscr: u32,
    pub flags: u32,
    pub clocks: Vec<(String, u32, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Qemu {
    pub machine: String,
    pub cpu: String,
    pub smp: u32,
    /// Bytes of RAM (`-m`): the board's single RAM bank.
    pub memory: u64,
    /// Extra `-device` values.
    pub devices: Vec<String>,
    /// Scratch disks (set in code, see [`QemuSection::disks`]).
    pub disks: Vec<Disk>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysRange {
    pub pa: u64,
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub ipa: u64,
    pub pa: u64,
    pub size: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    pub name: String,
    pub cpus: Vec<u32>,
    pub payload: String,
    pub bootargs: Option<String>,
    pub console: Option<u64>,
    pub memory: Vec<Window>,
    pub devices: Vec<Window>,
    pub pci: Vec<Bdf>,
    pub stream_ids: Vec<u32>,
    pub test_services: bool,
    pub power_controller: Option<u64>,
    pub power_votes: Vec<Bdf>,
}

/// Parses `bb:dd.f` (hex bus and device, as `lspci` prints them).
pub fn parse_bdf(text: &str) -> Result<Bdf, String> {
    let bad = || format!("{text:?} is not a PCI function: write bb:dd.f, e.g. \"00:01.0\"");
    let (bus, rest) = text.split_once(':').ok_or_else(bad)?;
    let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
    let hex = |s: &str, width: usize| {
        if s.len() == width && s.chars().all(|c| c.is_ascii_hexdigit()) {
            u8::from_str_radix(s, 16).map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let bdf = Bdf {
        bus: hex(bus, 2)?,
        device: hex(dev, 2)?,
        function: hex(func, 1)?,
    };
    if bdf.device >= 32 {
        return Err(format!(
            "{text:?}: device {:#04x} is not below 32",
            bdf.device
        ));
    }
    if bdf.function >= 8 {
        return Err(format!(
            "{text:?}: function {} is not below 8",
            bdf.function
        ));
    }
    Ok(bdf)
}

/// Formats an address range for messages.
fn span(start: u64, size: u64) -> String {
    format!(
        "{start:#x}..{:#x}",
        start.saturating_add(size) // display only
    )
}

fn overlaps(a: u64, a_size: u64, b: u64, b_size: u64) -> bool {
    a < b.saturating_add(b_size) && b < a.saturating_add(a_size)
}

/// Collects errors as `<file>: <field>: <message>`.
struct Errors<'a> {
    file: &'a str,
    list: Vec<String>,
}

impl Errors<'_> {
    fn push(&mut self, field: impl fmt::Display, msg: impl fmt::Display) {
        self.list.push(format!("{}: {field}: {msg}", self.file));
    }
}

/// Reads and parses a board file; `display` is the path used in messages.
pub fn parse(text: &str, display: &str) -> Result<BoardFile> {
    toml::from_str(text).map_err(|e| anyhow::anyhow!("{display}: {e}"))
}

/// Loads `boards/<name>/board.toml` from the repository at `root` (parse only).
pub fn load(root: &Path, name: &str) -> Result<(BoardFile, String)> {
    let rel = format!("boards/{name}/board.toml");
    let path = root.join(&rel);
    if !path.is_file() {
        let mut known: Vec<String> = std::fs::read_dir(root.join("boards"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().join("board.toml").is_file())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        known.sort();
        bail!(
            "no board {name:?}: {rel} does not exist (boards: {})",
            known.join(", ")
        );
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {rel}"))?;
    let file = parse(&text, &rel)?;
    if file.board.name != name {
        bail!(
            "{rel}: board.name: {:?} does not match the folder name {name:?}",
            file.board.name
        );
    }
    Ok((file, rel))
}

impl BoardFile {
    /// Replaces every VM's payload (`--guest`).
    pub fn set_payload(&mut self, payload: &str) {
        for vm in &mut self.vm {
            vm.payload = payload.to_owned();
        }
    }

    /// Replaces the number of CPUs QEMU is started with (`--smp`).
    pub fn set_smp(&mut self, smp: u32) -> Result<()> {
        match &mut self.qemu {
            Some(q) => {
                q.smp = smp;
                Ok(())
            }
            None => bail!("board {:?} has no [qemu] section", self.board.name),
        }
    }

    /// Replaces QEMU's `-M` machine options.
    pub fn set_machine(&mut self, machine: &str) -> Result<()> {
        match &mut self.qemu {
            Some(q) => {
                q.machine = machine.to_owned();
                Ok(())
            }
            None => bail!("board {:?} has no [qemu] section", self.board.name),
        }
    }

    /// Replaces the bootargs of the VM at `index`.
    pub fn set_bootargs(&mut self, index: usize, bootargs: &str) -> Result<()> {
        let name = &self.board.name;
        let vm = self
            .vm
            .get_mut(index)
            .with_context(|| format!("board {name:?} has no vm[{index}]"))?;
        vm.bootargs = Some(bootargs.to_owned());
        Ok(())
    }

    /// Checks everything and resolves sizes. `file` names the board file in messages;
    /// `guests_dir` is where payload crates live. All problems are reported together.
    pub fn validate(&self, file: &str, guests_dir: &Path) -> Result<Board> {
        let mut e = Errors {
            file,
            list: Vec::new(),
        };
        let board = self.check(&mut e, guests_dir);
        if e.list.is_empty() {
            Ok(board)
        } else {
            bail!("{}", e.list.join("\n"))
        }
    }

    fn check(&self, e: &mut Errors, guests_dir: &Path) -> Board {
        let b = &self.board;
        if b.name.trim().is_empty() {
            e.push("board.name", "must not be empty");
        }
        let exit = match b.exit.as_str() {
            "semihosting" => Exit::Semihosting,
            "psci" => Exit::Psci,
            other => {
                e.push(
                    "board.exit",
                    format!("{other:?} is not \"semihosting\" or \"psci\""),
                );
                Exit::Psci
            }
        };
        if let Some(c) = b.early_console {
            aligned(e, "board.early_console", c);
        }
        let hyp_pool = size(e, "board.hyp_pool", &b.hyp_pool);
        if hyp_pool != 0 && hyp_pool < MIN_HYP_POOL {
            e.push(
                "board.hyp_pool",
                format!("{hyp_pool:#x} bytes is less than the minimum of 4M ({MIN_HYP_POOL:#x})"),
            );
        }
        let ranges = |e: &mut Errors, what: &str, list: &[Range]| -> Vec<PhysRange> {
            list.iter()
                .enumerate()
                .map(|(i, r)| {
                    let field = format!("board.{what}[{i}]");
                    aligned(e, &format!("{field}.pa"), r.pa);
                    let size = size(e, &format!("{field}.size"), &r.size);
                    end(e, &field, r.pa, size);
                    PhysRange { pa: r.pa, size }
                })
                .collect()
        };
        let ram = ranges(e, "ram", &b.ram);
        let reserved = ranges(e, "reserved", &b.reserved);
        for (i, a) in ram.iter().enumerate() {
            for (j, c) in ram.iter().enumerate().take(i) {
                if overlaps(a.pa, a.size, c.pa, c.size) {
                    e.push(
                        format!("board.ram[{i}]"),
                        format!(
                            "{} overlaps board.ram[{j}] {}",
                            span(a.pa, a.size),
                            span(c.pa, c.size)
                        ),
                    );
                }
            }
        }

        let qemu = self.qemu.as_ref().map(|q| {
            if q.machine.trim().is_empty() {
                e.push("qemu.machine", "must not be empty");
            }
            if q.cpu.trim().is_empty() {
                e.push("qemu.cpu", "must not be empty");
            }
            if q.smp == 0 {
                e.push("qemu.smp", "must be at least 1");
            }
            let memory = match ram.as_slice() {
                [bank] => bank.size,
                _ => {
                    e.push(
                        "board.ram",
                        format!(
                            "a board with a [qemu] section needs exactly one RAM bank (QEMU's -m), not {}",
                            ram.len()
                        ),
                    );
                    0
                }
            };
            for (i, d) in q.disks.iter().enumerate() {
                if !d.path.is_absolute() {
                    e.push(
                        format!("qemu.disks[{i}].path"),
                        format!("{} is not an absolute path", d.path.display()),
                    );
                }
                if d.size == 0 || !d.size.is_multiple_of(SECTOR) {
                    e.push(
                        format!("qemu.disks[{i}].size"),
                        format!("{:#x} is not a non-zero multiple of 512", d.size),
                    );
                }
                if d.args.is_empty() {
                    e.push(
                        format!("qemu.disks[{i}].args"),
                        "a disk needs the QEMU arguments that attach it",
                    );
                }
            }
            Qemu {
                machine: q.machine.clone(),
                cpu: q.cpu.clone(),
                smp: q.smp,
                memory,
                devices: q.devices.clone(),
                disks: q.disks.clone(),
            }
        });

        if self.vm.is_empty() {
            e.push("vm", "the board has no VMs: add at least one [[vm]]");
        }
        let vms: Vec<Vm> = self
            .vm
            .iter()
            .enumerate()
            .map(|(i, v)| check_vm(e, i, v, guests_dir))
            .collect();

        // Names unique.
        for (i, vm) in vms.iter().enumerate() {
            if let Some(j) = vms[..i].iter().position(|o| o.name == vm.name)
                && !vm.name.is_empty()
            {
                e.push(
                    format!("vm[{i}].name"),
                    format!("{:?} is already the name of vm[{j}]", vm.name),
                );
            }
        }
        // CPUs: each owned by one VM, and present on a QEMU board.
        let mut owner: BTreeMap<u32, usize> = BTreeMap::new();
        for (i, vm) in vms.iter().enumerate() {
            for (k, &cpu) in vm.cpus.iter().enumerate() {
                let field = format!("vm[{i}].cpus[{k}]");
                if let Some(q) = &qemu
                    && cpu >= q.smp
                {
                    e.push(
                        &field,
                        format!("CPU {cpu} does not exist: qemu.smp is {}", q.smp),
                    );
                }
                match owner.get(&cpu) {
                    Some(&j) if j == i => {
                        e.push(&field, format!("CPU {cpu} is listed twice"));
                    }
                    Some(&j) => e.push(
                        &field,
                        format!("CPU {cpu} is already owned by vm[{j}] {:?}", vms[j].name),
                    ),
                    None => {
                        owner.insert(cpu, i);
                    }
                }
            }
        }
        // Host-physical layout: memory and devices never overlap each other (across all VMs),
        // memory stays inside RAM and outside reserved ranges, devices stay outside RAM.
        let mut phys: Vec<(String, u64, u64, bool)> = Vec::new(); // (field, pa, size, is_memory)
        for (i, vm) in vms.iter().enumerate() {
            for (k, m) in vm.memory.iter().enumerate() {
                phys.push((format!("vm[{i}].memory[{k}]"), m.pa, m.size, true));
            }
            for (k, d) in vm.devices.iter().enumerate() {
                phys.push((format!("vm[{i}].devices[{k}]"), d.pa, d.size, false));
            }
        }
        for (n, (field, pa, size, is_mem)) in phys.iter().enumerate() {
            if *size == 0 {
                continue;
            }
            for (other, opa, osize, _) in phys[..n].iter() {
                if overlaps(*pa, *size, *opa, *osize) {
                    e.push(
                        format!("{field}.pa"),
                        format!(
                            "{} overlaps {other} {}",
                            span(*pa, *size),
                            span(*opa, *osize)
                        ),
                    );
                }
            }
            if *is_mem {
                for (r, res) in reserved.iter().enumerate() {
                    if overlaps(*pa, *size, res.pa, res.size) {
                        e.push(
                            format!("{field}.pa"),
                            format!(
                                "{} overlaps board.reserved[{r}] {}",
                                span(*pa, *size),
                                span(res.pa, res.size)
                            ),
                        );
                    }
                }
                let inside = ram.iter().any(|b| {
                    *pa >= b.pa && pa.saturating_add(*size) <= b.pa.saturating_add(b.size)
                });
                if !ram.is_empty() && !inside {
                    e.push(
                        format!("{field}.pa"),
                        format!("{} is not inside any board.ram bank", span(*pa, *size)),
                    );
                }
            } else {
                if let Some(c) = b.early_console
                    && overlaps(*pa, *size, c, PAGE)
                {
                    e.push(
                        format!("{field}.pa"),
                        format!(
                            "{} holds the hypervisor's console board.early_console {c:#x}",
                            span(*pa, *size)
                        ),
                    );
                }
                for (r, bank) in ram.iter().enumerate() {
                    if overlaps(*pa, *size, bank.pa, bank.size) {
                        e.push(
                            format!("{field}.pa"),
                            format!(
                                "device {} overlaps RAM board.ram[{r}] {}",
                                span(*pa, *size),
                                span(bank.pa, bank.size)
                            ),
                        );
                    }
                }
            }
        }
        // PCI functions and stream IDs: each belongs to one VM.
        let mut seen_pci: BTreeMap<(u8, u8, u8), usize> = BTreeMap::new();
        let mut seen_sid: BTreeMap<u32, usize> = BTreeMap::new();
        for (i, vm) in vms.iter().enumerate() {
            for (k, p) in vm.pci.iter().enumerate() {
                if let Some(j) = seen_pci.insert((p.bus, p.device, p.function), i) {
                    e.push(
                        format!("vm[{i}].pci[{k}]"),
                        format!("{:?} is already assigned to vm[{j}]", self.vm[i].pci[k]),
                    );
                }
            }
            for (k, &sid) in vm.stream_ids.iter().enumerate() {
                if let Some(j) = seen_sid.insert(sid, i) {
                    e.push(
                        format!("vm[{i}].stream_ids[{k}]"),
                        format!("stream ID {sid:#x} is already used by vm[{j}]"),
                    );
                }
            }
        }

        let smmu_power = self.smmu_power.as_ref().map(|p| check_power(e, p));
        for (i, vm) in vms.iter().enumerate() {
            if !vm.power_votes.is_empty() && smmu_power.is_none() {
                e.push(
                    format!("vm[{i}].power_votes"),
                    "power votes need an [smmu_power] section (the SMMU's power domain)",
                );
            }
        }

        Board {
            name: b.name.clone(),
            exit,
            early_console: b.early_console,
            hyp_pool,
            ram,
            reserved,
            qemu,
            smmu_power,
            vms,
        }
    }
}

fn check_power(e: &mut Errors, p: &SmmuPowerSection) -> SmmuPower {
    let autosuspend_ms = p.autosuspend_ms.unwrap_or(20);
    if autosuspend_ms > 60_000 {
        e.push(
            "smmu_power.autosuspend_ms",
            format!("{autosuspend_ms} ms is over a minute"),
        );
    }
    let gdsc = match (p.domain.as_str(), &p.gdsc) {
        ("simulated", None) => None,
        ("simulated", Some(_)) => {
            e.push(
                "smmu_power.gdsc",
                "a simulated domain has no GDSC (set domain = \"gdsc\")",
            );
            None
        }
        ("gdsc", None) => {
            e.push(
                "smmu_power.gdsc",
                "domain = \"gdsc\" needs a gdsc = { ... }",
            );
            None
        }
        ("gdsc", Some(g)) => Some(check_gdsc(e, g)),
        (other, _) => {
            e.push(
                "smmu_power.domain",
                format!("{other:?} is not \"simulated\" or \"gdsc\""),
            );
            None
        }
    };
    SmmuPower {
        autosuspend_ms,
        gdsc,
    }
}

fn check_gdsc(e: &mut Errors, g: &GdscSection) -> Gdsc {
    if g.name.trim().is_empty() {
        e.push("smmu_power.gdsc.name", "must not be empty");
    }
    aligned(e, "smmu_power.gdsc.base", g.base);
    let size = size(e, "smmu_power.gdsc.size", &g.size);
    end(e, "smmu_power.gdsc.base", g.base, size);
    let reg_ok = |off: u32| off.is_multiple_of(4) && u64::from(off) + 8 <= size;
    if size != 0 && !reg_ok(g.gdscr) {
        e.push(
            "smmu_power.gdsc.gdscr",
            format!(
                "{:#x} is not a 4-byte aligned register (with CFG_GDSCR after it) inside the {size:#x}-byte window",
                g.gdscr
            ),
        );
    }
    let mut flags = 0;
    for (k, f) in g.flags.iter().enumerate() {
        match GDSC_FLAGS.iter().find(|(n, _)| n == f) {
            Some((_, bit)) => flags |= bit,
            None => e.push(
                format!("smmu_power.gdsc.flags[{k}]"),
                format!(
                    "{f:?} is not one of {}",
                    GDSC_FLAGS
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        }
    }
    let clocks = g
        .clocks
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let halt = c.halt.clone().unwrap_or_else(|| "check".into());
            if !["check", "voted", "delay", "skip"].contains(&halt.as_str()) {
                e.push(
                    format!("smmu_power.gdsc.clocks[{k}].halt"),
                    format!("{halt:?} is not \"check\", \"voted\", \"delay\" or \"skip\""),
                );
            }
            if size != 0 && !(c.cbcr.is_multiple_of(4) && u64::from(c.cbcr) + 4 <= size) {
                e.push(
                    format!("smmu_power.gdsc.clocks[{k}].cbcr"),
                    format!("{:#x} is not a register inside the window", c.cbcr),
                );
            }
            (c.name.clone(), c.cbcr, halt)
        })
        .collect();
    Gdsc {
        name: g.name.clone(),
        base: g.base,
        size,
        gdscr: g.gdscr,
        flags,
        clocks,
    }
}

/// Resolves a size: parses, non-zero, page aligned. Returns 0 after reporting an error.
fn size(e: &mut Errors, field: &str, s: &Size) -> u64 {
    match s.resolve() {
        Err(msg) => {
            e.push(field, msg);
            0
        }
        Ok(0) => {
            e.push(field, "must not be zero");
            0
        }
        Ok(v) if !v.is_multiple_of(PAGE) => {
            e.push(field, format!("{v:#x} is not a multiple of 4K"));
            0
        }
        Ok(v) => v,
    }
}

fn aligned(e: &mut Errors, field: &str, addr: u64) {
    if !addr.is_multiple_of(PAGE) {
        e.push(field, format!("{addr:#x} is not 4K aligned"));
    }
}

fn end(e: &mut Errors, field: &str, start: u64, size: u64) {
    if start.checked_add(size).is_none() {
        e.push(field, "the range runs past the end of the address space");
    }
}

fn check_vm(e: &mut Errors, i: usize, v: &VmSection, guests_dir: &Path) -> Vm {
    let f = |s: &str| format!("vm[{i}].{s}");
    if v.name.trim().is_empty() {
        e.push(f("name"), "must not be empty");
    }
    if v.cpus.is_empty() {
        e.push(f("cpus"), "must list at least one CPU");
    }
    if v.payload.trim().is_empty() {
        e.push(f("payload"), "must not be empty");
    } else if v.payload == LINUX_PAYLOAD {
        // Not a crate: Debian's kernel and our initramfs (`xtask/src/linux.rs`).
    } else if v.payload.contains(['/', '\\']) || v.payload.starts_with('.') {
        e.push(
            f("payload"),
            format!("{:?} is not a crate name under guests/", v.payload),
        );
    } else if !guests_dir.join(&v.payload).join("Cargo.toml").is_file() {
        e.push(
            f("payload"),
            format!(
                "{:?} is not a guest: guests/{}/Cargo.toml does not exist",
                v.payload, v.payload
            ),
        );
    }
    let windows = |e: &mut Errors, what: &str, list: &[Region]| -> Vec<Window> {
        list.iter()
            .enumerate()
            .map(|(k, r)| {
                let field = format!("vm[{i}].{what}[{k}]");
                aligned(e, &format!("{field}.ipa"), r.ipa);
                aligned(e, &format!("{field}.pa"), r.pa);
                let size = size(e, &format!("{field}.size"), &r.size);
                end(e, &format!("{field}.ipa"), r.ipa, size);
                end(e, &format!("{field}.pa"), r.pa, size);
                Window {
                    ipa: r.ipa,
                    pa: r.pa,
                    size,
                }
            })
            .collect()
    };
    let memory = windows(e, "memory", &v.memory);
    let devices = windows(e, "devices", &v.devices);
    match memory.first() {
        None => e.push(f("memory"), "must list at least one region"),
        Some(first) if first.size != 0 && first.size < MIN_FIRST_REGION => e.push(
            f("memory[0].size"),
            format!(
                "{:#x} bytes is too small: the first region holds the DTB and the payload and needs at least 4M",
                first.size
            ),
        ),
        Some(_) => {}
    }
    if let Some(c) = v.console {
        aligned(e, &f("console"), c);
    }
    // Guest-physical layout inside this VM.
    let mut ipa: Vec<(String, u64, u64)> = Vec::new();
    for (k, m) in memory.iter().enumerate() {
        ipa.push((f(&format!("memory[{k}]")), m.ipa, m.size));
    }
    for (k, d) in devices.iter().enumerate() {
        ipa.push((f(&format!("devices[{k}]")), d.ipa, d.size));
    }
    if let Some(c) = v.console {
        ipa.push((f("console"), c, PAGE));
    }
    if let Some(p) = v.power_controller {
        aligned(e, &f("power_controller"), p);
        ipa.push((f("power_controller"), p, PAGE));
    }
    for (n, (field, start, size)) in ipa.iter().enumerate() {
        if *size == 0 {
            continue;
        }
        for (other, ostart, osize) in &ipa[..n] {
            if overlaps(*start, *size, *ostart, *osize) {
                let field = if field.ends_with("console") || field.ends_with("power_controller") {
                    field.clone()
                } else {
                    format!("{field}.ipa")
                };
                e.push(
                    field,
                    format!(
                        "IPA {} overlaps {other} {}",
                        span(*start, *size),
                        span(*ostart, *osize)
                    ),
                );
            }
        }
    }
    let pci: Vec<Bdf> = v
        .pci
        .iter()
        .enumerate()
        .filter_map(|(k, p)| match parse_bdf(p) {
            Ok(b) => Some(b),
            Err(msg) => {
                e.push(f(&format!("pci[{k}]")), msg);
                None
            }
        })
        .collect();
    for (k, sid) in v.stream_ids.iter().enumerate() {
        if v.stream_ids[..k].contains(sid) {
            e.push(
                f(&format!("stream_ids[{k}]")),
                format!("stream ID {sid:#x} is listed twice"),
            );
        }
    }
    let mut power_votes: Vec<Bdf> = Vec::new();
    for (k, p) in v.power_votes.iter().enumerate() {
        let field = f(&format!("power_votes[{k}]"));
        match parse_bdf(p) {
            Err(msg) => e.push(field, msg),
            Ok(b) if !pci.contains(&b) => e.push(
                field,
                format!("{p:?} is not one of this VM's pci functions"),
            ),
            Ok(b) if power_votes.contains(&b) => e.push(field, format!("{p:?} is listed twice")),
            Ok(b) => power_votes.push(b),
        }
    }
    if !v.power_votes.is_empty() && v.power_controller.is_none() {
        e.push(
            f("power_controller"),
            "power votes need a power controller (its IPA) to vote through",
        );
    }
    Vm {
        name: v.name.clone(),
        cpus: v.cpus.clone(),
        payload: v.payload.clone(),
        bootargs: v.bootargs.clone(),
        console: v.console,
        memory,
        devices,
        pci,
        stream_ids: v.stream_ids.clone(),
        test_services: v.test_services,
        power_controller: v.power_controller,
        power_votes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const FILE: &str = "boards/test/board.toml";

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf()
    }

    fn guests() -> PathBuf {
        root().join("guests")
    }

    /// A valid two-VM QEMU board.
    const GOOD: &str = r#"
[board]
name = "test"
exit = "semihosting"
early_console = 0x0900_0000
hyp_pool = "32M"
ram = [{ pa = 0x4000_0000, size = "1G" }]
reserved = [{ pa = 0x4000_0000, size = "256M" }]

[qemu]
machine = "virt,virtualization=on,gic-version=3,iommu=smmuv3"
cpu = "max"
smp = 4

[[vm]]
name = "vm0"
cpus = [0, 1]
payload = "selftest"
bootargs = "selftest.tests=all"
console = 0x0900_0000
memory = [{ ipa = 0x8000_0000, pa = 0x5000_0000, size = "64M" }]
devices = [{ ipa = 0x0a00_0000, pa = 0x0a00_0000, size = "4K" }]
pci = ["00:01.0"]
stream_ids = [8]

[[vm]]
name = "vm1"
cpus = [2, 3]
payload = "selftest"
console = 0x0900_0000
memory = [{ ipa = 0x8000_0000, pa = 0x5800_0000, size = 0x400_0000 }]
"#;

    fn good() -> BoardFile {
        parse(GOOD, FILE).unwrap()
    }

    /// Validates and returns the error text, which must be non-empty.
    fn err(b: &BoardFile) -> String {
        match b.validate(FILE, &guests()) {
            Ok(_) => panic!("board validated but should not have"),
            Err(e) => e.to_string(),
        }
    }

    /// Asserts that validation fails with a message naming `field` and containing `text`.
    fn assert_err(b: &BoardFile, field: &str, text: &str) {
        let msg = err(b);
        let line = msg
            .lines()
            .find(|l| l.starts_with(&format!("{FILE}: {field}: ")))
            .unwrap_or_else(|| panic!("no error for {field} in:\n{msg}"));
        assert!(line.contains(text), "{line:?} does not contain {text:?}");
    }

    #[test]
    fn smmu_power_and_votes() {
        let text = format!("{GOOD}\n[smmu_power]\ndomain = \"simulated\"\n").replace(
            "stream_ids = [8]\n",
            "stream_ids = [8]\npower_controller = 0x0c00_0000\npower_votes = [\"00:01.0\"]\n",
        );
        let b = parse(&text, FILE)
            .unwrap()
            .validate(FILE, &guests())
            .unwrap();
        let p = b.smmu_power.as_ref().unwrap();
        assert_eq!((p.autosuspend_ms, p.gdsc.is_none()), (20, true));
        assert_eq!(b.vms[0].power_controller, Some(0x0c00_0000));
        assert_eq!(b.vms[0].power_votes.len(), 1);

        // A vote for a function the VM does not own, and no power domain to vote for.
        let mut bad = parse(&text, FILE).unwrap();
        bad.vm[0].power_votes = vec!["00:02.0".into()];
        assert_err(
            &bad,
            "vm[0].power_votes[0]",
            "not one of this VM's pci functions",
        );
        let mut bad = parse(&text, FILE).unwrap();
        bad.smmu_power = None;
        assert_err(&bad, "vm[0].power_votes", "need an [smmu_power] section");
        let mut bad = parse(&text, FILE).unwrap();
        bad.vm[0].power_controller = None;
        assert_err(&bad, "vm[0].power_controller", "need a power controller");
        let mut bad = parse(&text, FILE).unwrap();
        bad.vm[0].power_controller = Some(0x0900_0000);
        assert_err(&bad, "vm[0].power_controller", "overlaps vm[0].console");

        // GDSC domains: flags, clocks, registers inside the window.
        let gdsc = format!(
            "{GOOD}\n[smmu_power]\ndomain = \"gdsc\"\nautosuspend_ms = 5\n\
             gdsc = {{ name = \"tbu\", base = 0x100000, size = \"64K\", gdscr = 0x3c, \
             flags = [\"votable\", \"skip_collapse\"], clocks = [{{ name = \"c\", cbcr = 0xc, halt = \"skip\" }}] }}\n"
        );
        let b = parse(&gdsc, FILE)
            .unwrap()
            .validate(FILE, &guests())
            .unwrap();
        let g = b.smmu_power.unwrap().gdsc.unwrap();
        assert_eq!((g.flags, g.gdscr, g.clocks.len()), (0x401, 0x3c, 1));
        let mut bad = parse(&gdsc, FILE).unwrap();
        let sec = bad.smmu_power.as_mut().unwrap().gdsc.as_mut().unwrap();
        sec.flags.push("fast".into());
        sec.gdscr = 0x1_0000;
        sec.clocks[0].halt = Some("never".into());
        assert_err(&bad, "smmu_power.gdsc.flags[2]", "is not one of votable");
        assert_err(
            &bad,
            "smmu_power.gdsc.gdscr",
            "inside the 0x10000-byte window",
        );
        assert_err(&bad, "smmu_power.gdsc.clocks[0].halt", "\"never\" is not");
        let mut bad = parse(&gdsc, FILE).unwrap();
        bad.smmu_power.as_mut().unwrap().domain = "pmic".into();
        assert_err(&bad, "smmu_power.domain", "\"pmic\" is not");
        bad.smmu_power.as_mut().unwrap().domain = "simulated".into();
        assert_err(&bad, "smmu_power.gdsc", "a simulated domain has no GDSC");
    }

    #[test]
    fn parses_and_resolves_good_board() {
        let b = good().validate(FILE, &guests()).unwrap();
        assert_eq!(b.name, "test");
        assert_eq!(b.exit, Exit::Semihosting);
        assert_eq!(b.early_console, Some(0x0900_0000));
        assert_eq!(b.hyp_pool, 32 << 20);
        assert_eq!(
            b.qemu,
            Some(Qemu {
                machine: "virt,virtualization=on,gic-version=3,iommu=smmuv3".into(),
                cpu: "max".into(),
                smp: 4,
                memory: 1 << 30,
                devices: vec![],
                disks: vec![],
            })
        );
        assert_eq!(b.vms.len(), 2);
        let vm0 = &b.vms[0];
        assert_eq!(vm0.cpus, [0, 1]);
        assert_eq!(vm0.console, Some(0x0900_0000));
        assert_eq!(vm0.bootargs.as_deref(), Some("selftest.tests=all"));
        assert_eq!(
            vm0.memory,
            [Window {
                ipa: 0x8000_0000,
                pa: 0x5000_0000,
                size: 64 << 20
            }]
        );
        assert_eq!(
            vm0.pci,
            [Bdf {
                bus: 0,
                device: 1,
                function: 0
            }]
        );
        assert_eq!(vm0.stream_ids, [8]);
        assert_eq!(b.vms[1].memory[0].size, 64 << 20);
        assert_eq!(b.vms[1].bootargs, None);
        assert!(b.vms[1].devices.is_empty());
    }

    #[test]
    fn shipped_boards_validate() {
        for name in ["qemu-virt", "qcom-sdm845"] {
            let (file, rel) = load(&root(), name).unwrap();
            file.validate(&rel, &guests())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn qemu_virt_matches_the_documented_layout() {
        let (file, rel) = load(&root(), "qemu-virt").unwrap();
        let b = file.validate(&rel, &guests()).unwrap();
        assert_eq!(b.exit, Exit::Semihosting);
        let q = b.qemu.unwrap();
        assert_eq!((q.smp, q.memory), (4, 1 << 30));
        assert_eq!(b.vms.len(), 2);
        for (vm, (cpus, pa)) in b
            .vms
            .iter()
            .zip([([0, 1], 0x5000_0000), ([2, 3], 0x5800_0000)])
        {
            assert_eq!(vm.cpus, cpus);
            assert_eq!(vm.memory[0].pa, pa);
            assert_eq!(vm.memory[0].ipa, 0x8000_0000);
            assert_eq!(vm.memory[0].size, 64 << 20);
            assert_eq!(vm.payload, "selftest");
            assert_eq!(vm.console, Some(0x0900_0000));
            // Clear of the hypervisor, its pool and QEMU's DTB.
            assert!(!overlaps(
                vm.memory[0].pa,
                vm.memory[0].size,
                0x4000_0000,
                0x1000_0000
            ));
        }
    }

    #[test]
    fn load_rejects_unknown_board_and_name_mismatch() {
        let e = load(&root(), "no-such-board").unwrap_err().to_string();
        assert!(e.contains("no board \"no-such-board\""), "{e}");
        assert!(e.contains("qemu-virt"), "{e}");

        let tmp = std::env::temp_dir().join(format!("xtask-board-{}", std::process::id()));
        std::fs::create_dir_all(tmp.join("boards/other")).unwrap();
        std::fs::write(tmp.join("boards/other/board.toml"), GOOD).unwrap();
        let e = load(&tmp, "other").unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&tmp);
        assert_eq!(
            e,
            "boards/other/board.toml: board.name: \"test\" does not match the folder name \"other\""
        );
    }

    #[test]
    fn size_parsing() {
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("1_024K"), Ok(1 << 20));
        assert!(parse_size("64X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("-4K").is_err());
        assert!(parse_size("99999999999T").unwrap_err().contains("64 bits"));
    }

    #[test]
    fn bdf_parsing() {
        assert_eq!(
            parse_bdf("00:01.0"),
            Ok(Bdf {
                bus: 0,
                device: 1,
                function: 0
            })
        );
        assert_eq!(
            parse_bdf("ff:1f.7"),
            Ok(Bdf {
                bus: 0xff,
                device: 0x1f,
                function: 7
            })
        );
        assert!(parse_bdf("00:20.0").unwrap_err().contains("below 32"));
        assert!(parse_bdf("00:01.8").unwrap_err().contains("below 8"));
        for bad in [
            "0:01.0", "00-01.0", "00:01", "00:1.0", "zz:01.0", "00:01.00",
        ] {
            assert!(parse_bdf(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let cases = [
            ("[board]", "[board]\ncolour = \"red\""),
            ("[qemu]", "[qemu]\nbios = \"x\""),
            ("name = \"vm1\"", "name = \"vm1\"\nmemroy = []"),
            ("size = \"64M\" }]", "size = \"64M\", flags = \"rw\" }]"),
        ];
        for (from, to) in cases {
            let text = GOOD.replacen(from, to, 1);
            assert_ne!(text, GOOD);
            let e = parse(&text, FILE).unwrap_err().to_string();
            assert!(e.starts_with(FILE), "{e}");
            assert!(e.contains("unknown field"), "{e}");
        }
        let e = parse("[board]\nname = \"x\"\n", FILE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field"), "{e}");
        let e = parse(&GOOD.replace("\"32M\"", "true"), FILE)
            .unwrap_err()
            .to_string();
        assert!(e.contains("a size"), "{e}");
    }

    #[test]
    fn empty_names() {
        let mut b = good();
        b.board.name = String::new();
        b.vm[1].name = " ".into();
        assert_err(&b, "board.name", "empty");
        assert_err(&b, "vm[1].name", "empty");
    }

    #[test]
    fn duplicate_vm_names() {
        let mut b = good();
        b.vm[1].name = "vm0".into();
        assert_err(&b, "vm[1].name", "\"vm0\" is already the name of vm[0]");
    }

    #[test]
    fn no_vms() {
        let mut b = good();
        b.vm.clear();
        assert_err(&b, "vm", "no VMs");
    }

    #[test]
    fn bad_exit() {
        let mut b = good();
        b.board.exit = "reboot".into();
        assert_err(
            &b,
            "board.exit",
            "\"reboot\" is not \"semihosting\" or \"psci\"",
        );
    }

    #[test]
    fn small_hyp_pool() {
        let mut b = good();
        b.board.hyp_pool = "2M".into();
        assert_err(&b, "board.hyp_pool", "minimum of 4M");
    }

    #[test]
    fn empty_cpus() {
        let mut b = good();
        b.vm[0].cpus.clear();
        assert_err(&b, "vm[0].cpus", "at least one CPU");
    }

    #[test]
    fn cpu_in_two_vms() {
        let mut b = good();
        b.vm[1].cpus = vec![1, 2];
        assert_err(
            &b,
            "vm[1].cpus[0]",
            "CPU 1 is already owned by vm[0] \"vm0\"",
        );
        // The exact form promised in the README.
        assert!(err(&b).contains(&format!(
            "{FILE}: vm[1].cpus[0]: CPU 1 is already owned by vm[0] \"vm0\""
        )));
    }

    #[test]
    fn cpu_twice_in_one_vm() {
        let mut b = good();
        b.vm[0].cpus = vec![0, 0];
        assert_err(&b, "vm[0].cpus[1]", "listed twice");
    }

    #[test]
    fn cpu_beyond_smp() {
        let mut b = good();
        b.set_smp(3).unwrap();
        assert_err(&b, "vm[1].cpus[1]", "CPU 3 does not exist: qemu.smp is 3");
        let mut b = good();
        b.vm[1].cpus = vec![2, 9];
        assert_err(&b, "vm[1].cpus[1]", "CPU 9 does not exist");
    }

    #[test]
    fn zero_smp() {
        let mut b = good();
        b.qemu.as_mut().unwrap().smp = 0;
        assert_err(&b, "qemu.smp", "at least 1");
    }

    #[test]
    fn bad_sizes() {
        let mut b = good();
        b.vm[0].memory[0].size = "64X".into();
        assert_err(&b, "vm[0].memory[0].size", "is not a size");
        let mut b = good();
        b.vm[1].memory[0].size = 0.into();
        assert_err(&b, "vm[1].memory[0].size", "must not be zero");
        let mut b = good();
        b.vm[0].devices[0].size = 0x1800.into();
        assert_err(&b, "vm[0].devices[0].size", "not a multiple of 4K");
        let mut b = good();
        b.board.hyp_pool = "".into();
        assert_err(&b, "board.hyp_pool", "is not a size");
    }

    #[test]
    fn unaligned_addresses() {
        let mut b = good();
        b.vm[0].memory[0].ipa += 0x10;
        b.vm[1].memory[0].pa += 0x800;
        b.vm[0].devices[0].pa += 4;
        b.vm[0].console = Some(0x0900_0100);
        assert_err(&b, "vm[0].memory[0].ipa", "not 4K aligned");
        assert_err(&b, "vm[1].memory[0].pa", "not 4K aligned");
        assert_err(&b, "vm[0].devices[0].pa", "not 4K aligned");
        assert_err(&b, "vm[0].console", "not 4K aligned");
        let mut b = good();
        b.board.ram[0].pa += 1;
        assert_err(&b, "board.ram[0].pa", "not 4K aligned");
    }

    #[test]
    fn first_region_too_small() {
        let mut b = good();
        b.vm[0].memory[0].size = "2M".into();
        assert_err(&b, "vm[0].memory[0].size", "at least 4M");
    }

    #[test]
    fn no_memory() {
        let mut b = good();
        b.vm[1].memory.clear();
        assert_err(&b, "vm[1].memory", "at least one region");
    }

    #[test]
    fn memory_pa_overlap_across_vms() {
        let mut b = good();
        b.vm[1].memory[0].pa = 0x5300_0000;
        assert_err(
            &b,
            "vm[1].memory[0].pa",
            "0x53000000..0x57000000 overlaps vm[0].memory[0] 0x50000000..0x54000000",
        );
    }

    #[test]
    fn memory_pa_overlap_inside_vm() {
        let mut b = good();
        b.vm[0].memory.push(Region {
            ipa: 0x9000_0000,
            pa: 0x5200_0000,
            size: "4K".into(),
        });
        assert_err(&b, "vm[0].memory[1].pa", "overlaps vm[0].memory[0]");
    }

    #[test]
    fn device_pa_overlaps_memory() {
        let mut b = good();
        b.vm[1].devices.push(Region {
            ipa: 0x0a00_0000,
            pa: 0x5000_0000,
            size: "4K".into(),
        });
        assert_err(&b, "vm[1].devices[0].pa", "overlaps vm[0].memory[0]");
    }

    #[test]
    fn device_pa_shared_between_vms() {
        let mut b = good();
        b.vm[1].devices = b.vm[0].devices.clone();
        assert_err(&b, "vm[1].devices[0].pa", "overlaps vm[0].devices[0]");
    }

    #[test]
    fn device_is_the_hypervisor_console() {
        let mut b = good();
        b.vm[0].devices[0].pa = 0x0900_0000;
        assert_err(&b, "vm[0].devices[0].pa", "board.early_console");
        let mut b = good();
        b.board.early_console = Some(0x0900_0004);
        assert_err(&b, "board.early_console", "not 4K aligned");
    }

    #[test]
    fn device_pa_in_ram() {
        let mut b = good();
        b.vm[0].devices[0].pa = 0x7000_0000;
        assert_err(&b, "vm[0].devices[0].pa", "overlaps RAM board.ram[0]");
    }

    #[test]
    fn memory_in_reserved_range() {
        let mut b = good();
        b.vm[0].memory[0].pa = 0x4800_0000;
        assert_err(&b, "vm[0].memory[0].pa", "overlaps board.reserved[0]");
    }

    #[test]
    fn memory_outside_ram() {
        let mut b = good();
        b.vm[1].memory[0].pa = 0x7e00_0000; // runs past the end of the 1G bank
        assert_err(&b, "vm[1].memory[0].pa", "not inside any board.ram bank");
    }

    #[test]
    fn qemu_board_needs_one_ram_bank() {
        let mut b = good();
        b.board.ram.clear();
        assert_err(&b, "board.ram", "exactly one RAM bank");
    }

    #[test]
    fn ram_banks_overlap() {
        let mut b = good();
        b.qemu = None;
        b.board.ram.push(Range {
            pa: 0x7000_0000,
            size: "1G".into(),
        });
        assert_err(&b, "board.ram[1]", "overlaps board.ram[0]");
    }

    #[test]
    fn ipa_overlap_inside_vm() {
        let mut b = good();
        b.vm[0].devices[0].ipa = 0x8100_0000;
        assert_err(&b, "vm[0].devices[0].ipa", "overlaps vm[0].memory[0]");
    }

    #[test]
    fn console_overlaps_device() {
        let mut b = good();
        b.vm[0].devices[0].ipa = 0x0900_0000;
        assert_err(&b, "vm[0].console", "overlaps vm[0].devices[0]");
    }

    #[test]
    fn same_ipa_in_two_vms_is_fine() {
        let mut b = good();
        b.vm[1].devices.push(Region {
            ipa: 0x0a00_0000,
            pa: 0x0b00_0000,
            size: "4K".into(),
        });
        b.validate(FILE, &guests()).unwrap();
    }

    #[test]
    fn address_overflow() {
        let mut b = good();
        b.vm[0].devices[0].ipa = 0xffff_ffff_ffff_f000;
        b.vm[0].devices[0].size = "8K".into();
        assert_err(&b, "vm[0].devices[0].ipa", "past the end");
    }

    #[test]
    fn bad_pci() {
        let mut b = good();
        b.vm[0].pci = vec!["00:01.0".into(), "00:40.0".into(), "0:1.0".into()];
        assert_err(&b, "vm[0].pci[1]", "below 32");
        assert_err(&b, "vm[0].pci[2]", "bb:dd.f");
    }

    #[test]
    fn pci_in_two_vms() {
        let mut b = good();
        b.vm[1].pci = vec!["00:01.0".into()];
        assert_err(&b, "vm[1].pci[0]", "already assigned to vm[0]");
    }

    #[test]
    fn stream_id_in_two_vms() {
        let mut b = good();
        b.vm[1].stream_ids = vec![9, 8];
        assert_err(
            &b,
            "vm[1].stream_ids[1]",
            "stream ID 0x8 is already used by vm[0]",
        );
    }

    #[test]
    fn stream_id_twice_in_one_vm() {
        let mut b = good();
        b.vm[0].stream_ids = vec![8, 8];
        assert_err(&b, "vm[0].stream_ids[1]", "listed twice");
    }

    #[test]
    fn missing_payload() {
        let mut b = good();
        b.vm[1].payload = "no-such-guest".into();
        assert_err(
            &b,
            "vm[1].payload",
            "guests/no-such-guest/Cargo.toml does not exist",
        );
        let mut b = good();
        b.vm[0].payload = "../hyp".into();
        assert_err(&b, "vm[0].payload", "not a crate name");
        let mut b = good();
        b.vm[0].payload = String::new();
        assert_err(&b, "vm[0].payload", "empty");
        // `linux` is no crate but Debian's kernel with our initramfs.
        let mut b = good();
        b.vm[0].payload = LINUX_PAYLOAD.into();
        assert_eq!(b.validate(FILE, &guests()).unwrap().vms[0].payload, "linux");
    }

    #[test]
    fn scratch_disks() {
        let disk = |path: &str, size: u64, args: &[&str]| Disk {
            path: path.into(),
            size,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        let mut b = good();
        let ok = disk("/tmp/d.img", 1 << 20, &["-drive", "file=/tmp/d.img"]);
        b.qemu.as_mut().unwrap().disks = vec![ok.clone()];
        assert_eq!(
            b.validate(FILE, &guests()).unwrap().qemu.unwrap().disks,
            [ok]
        );
        b.qemu.as_mut().unwrap().disks = vec![disk("d.img", 1000, &[])];
        assert_err(&b, "qemu.disks[0].path", "not an absolute path");
        assert_err(&b, "qemu.disks[0].size", "multiple of 512");
        assert_err(&b, "qemu.disks[0].args", "QEMU arguments");
        // Not part of the board file's schema.
        let text = GOOD.replace("smp = 4\n", "smp = 4\ndisks = []\n");
        let e = parse(&text, FILE).unwrap_err().to_string();
        assert!(e.contains("unknown field `disks`"), "{e}");
    }

    #[test]
    fn all_errors_are_reported_together() {
        let mut b = good();
        b.board.exit = "x".into();
        b.vm[1].cpus = vec![0];
        b.vm[1].memory[0].size = "1M".into();
        let msg = err(&b);
        assert_eq!(msg.lines().count(), 3, "{msg}");
        assert!(msg.lines().all(|l| l.starts_with(FILE)), "{msg}");
    }

    #[test]
    fn overrides() {
        let mut b = good();
        b.set_bootargs(0, "selftest.panic").unwrap();
        b.set_payload("selftest");
        b.set_smp(8).unwrap();
        let v = b.validate(FILE, &guests()).unwrap();
        assert_eq!(v.vms[0].bootargs.as_deref(), Some("selftest.panic"));
        assert_eq!(v.vms[1].bootargs, None);
        assert_eq!(v.qemu.unwrap().smp, 8);
        assert!(b.set_bootargs(5, "x").is_err());
        b.qemu = None;
        assert!(b.set_smp(2).is_err());
    }

    #[test]
    fn board_without_qemu_needs_no_ram() {
        let mut b = good();
        b.qemu = None;
        b.board.ram.clear();
        b.board.exit = "psci".into();
        let v = b.validate(FILE, &guests()).unwrap();
        assert_eq!(v.exit, Exit::Psci);
        assert!(v.qemu.is_none());
    }
}
