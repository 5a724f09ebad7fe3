//! Deriving a VM's device tree from the host's.
//!
//! The guest DTB starts from the blob the hypervisor was booted with, so that whatever the
//! bootloader put there (bootargs, board quirks) reaches the guest, and is then cut down to what
//! the VM may see. `vm_fdt` only writes trees front to back, so the host tree is walked with our
//! [`Tree`] index and re-emitted node by node, copying properties as raw bytes (phandles
//! included, so references between kept nodes stay valid).
//!
//! What the guest gets:
//! * the root node's properties, unchanged;
//! * `/chosen` without host-physical pointers (`linux,initrd-*`, `linux,elfcorehdr`,
//!   `linux,usable-memory-range`, `linux,uefi-*`) and without `kaslr-seed`/`rng-seed`: every
//!   VM derived from one host blob would otherwise share the same "random" seed, and Linux
//!   credits `rng-seed` as entropy. `bootargs` is replaced when [`GuestSpec::bootargs`] is set;
//!   `stdout-path` survives only if it names a kept node (else it points at the console PL011).
//!   The hypervisor adds `linux,initrd-start`/`linux,initrd-end` (64-bit) for
//!   [`GuestSpec::initrd`] and `linux,pci-probe-only = <1>` for [`GuestSpec::pci_probe_only`]
//!   (with [`GuestSpec::keep_pci`]; the host's value is replaced): the hypervisor has placed the
//!   BARs of the VM's functions and emulates config space accordingly, so Linux must keep them;
//! * one `memory@<base>` node per [`GuestSpec::memory`] region (the host's are dropped);
//! * `/cpus` rebuilt with [`GuestSpec::vcpus`] CPUs whose `reg` (MPIDR Aff0) is the vCPU index;
//! * `/psci` rebuilt (PSCI 1.0/0.2, [`GuestSpec::psci_method`]);
//! * the GICv3 and its children except ITSs, the architected timer, every `fixed-clock`, the
//!   PL011 at [`GuestSpec::console`], the PCIe host and SMMUs when [`GuestSpec::keep_pci`], and
//!   any node whose first `reg` region lies inside one of [`GuestSpec::devices`] (with its
//!   subtree);
//! * nodes without `reg` only as containers of kept nodes (e.g. a `simple-bus`); the rest of
//!   them (PMU, `gpio-keys`, `platform-bus`, `__symbols__`) is dropped, as is every node with
//!   `reg` outside the VM's devices (virtio-mmio, flash, fw-cfg, unowned PL031/PL061);
//! * `/aliases` entries that name kept nodes;
//! * memory reservations and a fresh `/reserved-memory` from [`GuestSpec::reserved`];
//! * a `power-controller@<ipa>` node for the emulated power controller when
//!   [`GuestSpec::power_controller`] is set (`compatible = "hyp,gdsc-controller"`,
//!   `#power-domain-cells = <1>`, `hyp,domains = <N>`): guest drivers of the masters whose
//!   power votes the hypervisor follows refer to it with `power-domains = <&pc i>`.
//!
//! No MSIs until the ITS is virtualised: the vGIC emulates the distributor and the
//! redistributors only, so every `arm,gic-v3-its` node is dropped, `msi-parent`, `msi-map` and
//! `msi-map-mask` are removed from every kept node (the PCIe host, SMMUs, platform devices), and
//! the GIC node loses `msi-controller`, `mbi-ranges` and `mbi-alias` (GICv3 MBIs need the
//! distributor's SETSPI registers, which the vGIC does not implement). Drivers then fall back to
//! wired interrupts: PCI functions to INTx through the PCIe host's `interrupt-map` (kept, its
//! phandles name the kept GIC), the SMMUv3 to its `interrupts`/`interrupt-names` (kept).
//!
//! The GIC's `reg` is copied as is: its redistributor region covers every physical CPU, and the
//! vGIC emulates one redistributor per vCPU at the start of it, with `GICR_TYPER.Last` set on the
//! last one, so Linux stops there. `#redistributor-regions` and `redistributor-stride` are kept.
//!
//! `iommus` of a kept device is dropped when it names an IOMMU the guest does not see (the
//! hypervisor owns the SMMU); other references to dropped nodes (clocks, power domains) are left
//! alone: put the providers' MMIO windows in [`GuestSpec::devices`] to keep them.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use vm_fdt::{FdtReserveEntry, FdtWriter, FdtWriterNode};

use super::DtError;
use super::blob;
use super::machine::Region;
use super::tree::{Tree, to_cells};
use crate::vdev::power_ctrl::POWER_CTRL_MMIO_SIZE;

/// What a VM's device tree should describe. All addresses are guest-physical (IPA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// Number of vCPUs (1..=256); vCPU `i` has MPIDR Aff0 = `i`.
    pub vcpus: usize,
    /// The VM's RAM.
    pub memory: Vec<Region>,
    /// Ranges the guest must leave alone (memory-reservation block and `/reserved-memory`).
    pub reserved: Vec<Region>,
    /// MMIO windows the VM owns (IPA == PA for now); host nodes inside them are kept.
    pub devices: Vec<Region>,
    /// IPA of the emulated PL011 the VM sees: the host PL011 node at that base is kept.
    pub console: Option<u64>,
    /// Replacement for `/chosen/bootargs`; `None` keeps the host's.
    pub bootargs: Option<String>,
    /// Keep the PCIe host and SMMU nodes (dropped by default).
    pub keep_pci: bool,
    /// PSCI conduit the guest uses: `"hvc"` for our guests.
    pub psci_method: &'static str,
    /// The emulated power controller the VM sees, if it has one (a node is added for it).
    pub power_controller: Option<PowerCtrlNode>,
    /// The initrd's IPA range, `(start, end)` with `end` exclusive: written to `/chosen` as
    /// 64-bit `linux,initrd-start`/`linux,initrd-end`. Must be non-empty and inside
    /// [`memory`](Self::memory). `None` writes none (the host's are always dropped).
    pub initrd: Option<(u64, u64)>,
    /// Tell Linux not to reassign PCI resources (`/chosen/linux,pci-probe-only = <1>`), because
    /// the hypervisor has placed the BARs. Only takes effect with [`keep_pci`](Self::keep_pci).
    pub pci_probe_only: bool,
}

/// Where the VM's emulated power controller (`vdev::power_ctrl`) is and how many domains it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerCtrlNode {
    /// IPA of its 4 KiB register window.
    pub ipa: u64,
    /// Number of GDSC-style domains (one per master with a vote source, in board order).
    pub domains: u32,
}

impl Default for GuestSpec {
    fn default() -> Self {
        Self {
            vcpus: 1,
            memory: Vec::new(),
            reserved: Vec::new(),
            devices: Vec::new(),
            console: None,
            bootargs: None,
            keep_pci: false,
            psci_method: "hvc",
            power_controller: None,
            initrd: None,
            pci_probe_only: false,
        }
    }
}

/// Most vCPUs we describe: Aff0 is 8 bits.
const MAX_VCPUS: usize = 256;

/// `/chosen` properties that hold host physical addresses or per-boot secrets.
fn chosen_prop_dropped(name: &str) -> bool {
    matches!(
        name,
        "linux,initrd-start"
            | "linux,initrd-end"
            | "linux,elfcorehdr"
            | "linux,usable-memory-range"
            | "linux,booted-from-kexec"
            | "kaslr-seed"
            | "rng-seed"
    ) || name.starts_with("linux,uefi-")
}

/// Properties naming MSI controllers: dropped from every kept node (no virtual ITS yet).
fn msi_prop(name: &str) -> bool {
    matches!(name, "msi-parent" | "msi-map" | "msi-map-mask")
}

/// Properties of the GIC node that offer it as an MSI controller (GICv3 MBIs).
fn gic_msi_prop(name: &str) -> bool {
    matches!(name, "msi-controller" | "mbi-ranges" | "mbi-alias")
}

fn is_gic(t: &Tree<'_>, i: usize) -> bool {
    t.is_compatible(i, |c| c == "arm,gic-v3")
}

fn is_its(t: &Tree<'_>, i: usize) -> bool {
    t.is_compatible(i, |c| c == "arm,gic-v3-its")
}

/// Builds a VM's DTB from the host's; see the module docs for what is kept.
pub fn derive_guest(host_dtb: &[u8], spec: &GuestSpec) -> Result<Vec<u8>, DtError> {
    check_spec(spec)?;
    let blob = blob::check(host_dtb)?;
    let fdt = blob.open()?;
    let tree = Tree::new(&fdt)?;
    let plan = Plan::new(&tree, spec)?;
    let reservations = spec
        .reserved
        .iter()
        .map(|r| FdtReserveEntry::new(r.base, r.size))
        .collect::<Result<Vec<_>, _>>()
        .and_then(|entries| FdtWriter::new_with_mem_reserv(&entries))
        .map_err(|e| DtError::Spec(format!("reserved regions {:x?}: {e}", spec.reserved)))?;
    let mut out = Emitter {
        t: &tree,
        spec,
        plan,
        w: reservations,
    };
    out.root()?;
    out.w.finish().map_err(|e| DtError::Write {
        path: "/".into(),
        msg: format!("{e}"),
    })
}

fn check_spec(spec: &GuestSpec) -> Result<(), DtError> {
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(DtError::Spec(format!(
            "vcpus = {} is not in 1..={MAX_VCPUS}",
            spec.vcpus
        )));
    }
    if spec.memory.is_empty() {
        return Err(DtError::Spec("no memory regions".into()));
    }
    if let Some(r) = spec
        .memory
        .iter()
        .find(|r| r.size == 0 || r.end().is_none())
    {
        return Err(DtError::Spec(format!(
            "memory region {:#x}+{:#x} is empty or wraps",
            r.base, r.size
        )));
    }
    let mut memory = spec.memory.clone();
    memory.sort_by_key(|r| r.base);
    if let Some(w) = memory.windows(2).find(|w| w[0].end() > Some(w[1].base)) {
        let msg = format!(
            "memory regions {:#x}+{:#x} and {:#x}+{:#x} overlap",
            w[0].base, w[0].size, w[1].base, w[1].size
        );
        return Err(DtError::Spec(msg));
    }
    if spec.power_controller.is_some_and(|pc| pc.domains == 0) {
        return Err(DtError::Spec("power controller without domains".into()));
    }
    if let Some((start, end)) = spec.initrd
        && (start >= end || !covered(&memory, start, end))
    {
        return Err(DtError::Spec(format!(
            "initrd {start:#x}..{end:#x} is empty or not inside the VM's memory"
        )));
    }
    if !matches!(spec.psci_method, "hvc" | "smc") {
        return Err(DtError::Spec(format!(
            "psci_method \"{}\" is not \"hvc\" or \"smc\"",
            spec.psci_method
        )));
    }
    Ok(())
}

/// Whether `sorted` (non-overlapping regions, by base) covers `start..end`.
fn covered(sorted: &[Region], start: u64, end: u64) -> bool {
    let mut at = start;
    for r in sorted {
        let r_end = r.end().unwrap_or(u64::MAX);
        if r.base <= at && at < r_end {
            at = r_end;
        }
        if at >= end {
            return true;
        }
    }
    false
}

/// How a child of `/` is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Chosen,
    Aliases,
    Cpus,
    Psci,
    Memory,
    ReservedMemory,
    Other,
}

/// Which host nodes the guest keeps.
struct Plan {
    keep: Vec<bool>,
    /// Phandles of kept nodes (for filtering `iommus`).
    phandles: Vec<u32>,
    /// Index of the console PL011, when [`GuestSpec::console`] is set.
    console: Option<usize>,
}

/// What the general rule says about one node.
enum Verdict {
    /// Keep it and everything below it.
    Keep,
    /// Drop it and everything below it.
    Drop,
    /// Keep it only if a descendant is kept.
    Container,
}

fn role(t: &Tree<'_>, i: usize) -> Role {
    match t.name(i) {
        _ if t.device_type_is(i, "memory") => Role::Memory,
        _ if t.is_compatible(i, |c| c.starts_with("arm,psci")) => Role::Psci,
        "chosen" => Role::Chosen,
        "aliases" => Role::Aliases,
        "cpus" => Role::Cpus,
        "reserved-memory" => Role::ReservedMemory,
        _ => Role::Other,
    }
}

fn is_pci_or_smmu(t: &Tree<'_>, i: usize) -> bool {
    t.is_compatible(i, |c| {
        matches!(
            c,
            "pci-host-ecam-generic"
                | "arm,smmu-v3"
                | "arm,mmu-500"
                | "arm,smmu-v2"
                | "qcom,smmu-v2"
        ) || (c.starts_with("qcom,") && c.ends_with("-smmu-500"))
    })
}

impl Plan {
    fn new(t: &Tree<'_>, spec: &GuestSpec) -> Result<Self, DtError> {
        let console = match spec.console {
            Some(base) => Some(find_console(t, base)?),
            None => None,
        };
        let mut plan = Plan {
            keep: alloc::vec![false; t.nodes.len()],
            phandles: Vec::new(),
            console,
        };
        plan.keep[0] = true;
        for &c in t.children(0) {
            match role(t, c) {
                Role::Other => _ = plan.mark(t, spec, c),
                Role::Chosen => {
                    for &cc in t.children(c) {
                        plan.mark(t, spec, cc);
                    }
                }
                _ => {}
            }
        }
        let kept = (0..t.nodes.len()).filter(|&i| plan.keep[i]);
        plan.phandles = kept.filter_map(|i| t.phandle(i).ok().flatten()).collect();
        Ok(plan)
    }

    fn verdict(&self, t: &Tree<'_>, spec: &GuestSpec, i: usize) -> Verdict {
        if is_its(t, i) {
            return Verdict::Drop;
        }
        let always = |c: &str| matches!(c, "arm,gic-v3" | "arm,armv8-timer" | "fixed-clock");
        if t.is_compatible(i, always) || self.console == Some(i) {
            return Verdict::Keep;
        }
        if is_pci_or_smmu(t, i) {
            return if spec.keep_pci {
                Verdict::Keep
            } else {
                Verdict::Drop
            };
        }
        if t.device_type_is(i, "memory") {
            return Verdict::Drop;
        }
        if t.prop(i, "reg").is_none() {
            return Verdict::Container;
        }
        let first = t.reg(i).ok().and_then(|r| r.first().copied());
        match first {
            Some(r) if spec.devices.iter().any(|d| d.contains(&r)) => Verdict::Keep,
            _ => Verdict::Drop,
        }
    }

    /// Applies the general rule to node `i`; returns whether it is kept.
    fn mark(&mut self, t: &Tree<'_>, spec: &GuestSpec, i: usize) -> bool {
        let kept = match self.verdict(t, spec, i) {
            Verdict::Keep => {
                self.keep_all(t, i);
                true
            }
            Verdict::Drop => false,
            Verdict::Container => {
                let mut any = false;
                for &c in t.children(i) {
                    any |= self.mark(t, spec, c);
                }
                any
            }
        };
        self.keep[i] = kept;
        kept
    }

    /// Keeps node `i` and its subtree, except ITSs (see the module docs).
    fn keep_all(&mut self, t: &Tree<'_>, i: usize) {
        self.keep[i] = true;
        for &c in t.children(i) {
            if !is_its(t, c) {
                self.keep_all(t, c);
            }
        }
    }

    /// Whether `iommus` of a kept node names only kept IOMMUs.
    fn iommus_kept(&self, t: &Tree<'_>, value: &[u8]) -> bool {
        let Some(cells) = to_cells(value) else {
            return false;
        };
        let mut rest = &cells[..];
        while let Some((&phandle, tail)) = rest.split_first() {
            let Some(iommu) = t.by_phandle(phandle) else {
                return false;
            };
            let n = match t.u32_prop(iommu, "#iommu-cells") {
                Ok(Some(n)) => n as usize,
                _ => return false,
            };
            if !self.phandles.contains(&phandle) || tail.len() < n {
                return false;
            }
            rest = &tail[n..];
        }
        true
    }
}

/// The host PL011 whose first `reg` region starts at `base`.
fn find_console(t: &Tree<'_>, base: u64) -> Result<usize, DtError> {
    let at_base = |&i: &usize| {
        t.reg(i)
            .ok()
            .and_then(|r| r.first().copied())
            .is_some_and(|r| r.base == base)
    };
    t.find_compatible(|c| c == "arm,pl011")
        .find(at_base)
        .ok_or_else(|| {
            DtError::Spec(format!(
                "console {base:#x}: the host device tree has no PL011 there"
            ))
        })
}

/// Writes the guest tree.
struct Emitter<'t, 'a> {
    t: &'t Tree<'a>,
    spec: &'t GuestSpec,
    plan: Plan,
    w: FdtWriter,
}

/// Encodes `value` as `cells` big-endian cells, if it fits.
fn encode_cells(out: &mut Vec<u8>, value: u64, cells: usize) -> bool {
    if cells == 0 || cells > 2 || (cells == 1 && value > u64::from(u32::MAX)) {
        return false;
    }
    if cells == 2 {
        out.extend_from_slice(&((value >> 32) as u32).to_be_bytes());
    }
    out.extend_from_slice(&(value as u32).to_be_bytes());
    true
}

impl Emitter<'_, '_> {
    fn werr(path: &str) -> impl Fn(vm_fdt::Error) -> DtError + '_ {
        move |e| DtError::Write {
            path: path.into(),
            msg: format!("{e}"),
        }
    }

    fn begin(&mut self, path: &str, name: &str) -> Result<FdtWriterNode, DtError> {
        self.w.begin_node(name).map_err(Self::werr(path))
    }

    fn end(&mut self, path: &str, node: FdtWriterNode) -> Result<(), DtError> {
        self.w.end_node(node).map_err(Self::werr(path))
    }

    fn prop(&mut self, path: &str, name: &str, value: &[u8]) -> Result<(), DtError> {
        self.w.property(name, value).map_err(Self::werr(path))
    }

    fn string(&mut self, path: &str, name: &str, value: &str) -> Result<(), DtError> {
        self.w
            .property_string(name, value)
            .map_err(Self::werr(path))
    }

    /// `reg` bytes for `regions` in the root's address space.
    fn root_reg(&self, regions: &[Region]) -> Result<Vec<u8>, DtError> {
        let (ac, sc) = (self.t.address_cells(0)?, self.t.size_cells(0)?);
        let mut out = Vec::new();
        for r in regions {
            if !encode_cells(&mut out, r.base, ac) || !encode_cells(&mut out, r.size, sc) {
                let msg = format!(
                    "region {:#x}+{:#x} does not fit / #address-cells = {ac}, #size-cells = {sc}",
                    r.base, r.size
                );
                return Err(DtError::Spec(msg));
            }
        }
        Ok(out)
    }

    fn root(&mut self) -> Result<(), DtError> {
        let t = self.t;
        let root = self.begin("/", "")?;
        for (name, value) in t.properties(0) {
            self.prop("/", name, value)?;
        }
        let mut done = Vec::new();
        for &c in t.children(0) {
            let role = role(t, c);
            if role == Role::ReservedMemory || (role != Role::Other && done.contains(&role)) {
                continue;
            }
            done.push(role);
            self.child(role, c)?;
        }
        for role in [Role::Chosen, Role::Cpus, Role::Psci, Role::Memory] {
            if !done.contains(&role) {
                self.child(role, 0)?;
            }
        }
        if !self.spec.reserved.is_empty() {
            self.reserved_memory()?;
        }
        if let Some(pc) = self.spec.power_controller {
            self.power_controller(pc)?;
        }
        self.end("/", root)
    }

    /// The emulated power controller (`vdev::power_ctrl`): a node the hypervisor invents, so the
    /// guest can find its registers and name its domains in `power-domains` (one cell: the index).
    fn power_controller(&mut self, pc: PowerCtrlNode) -> Result<(), DtError> {
        let path = format!("/power-controller@{:x}", pc.ipa);
        let name = &path[1..];
        // A host node of that name could only be kept if its window were the VM's: two nodes
        // with one name would make the guest see only one of them.
        let t = self.t;
        if t.children(0)
            .iter()
            .any(|&c| self.plan.keep[c] && t.name(c) == name)
        {
            return Err(DtError::Spec(format!(
                "power controller {:#x}: the guest already has a node {name}",
                pc.ipa
            )));
        }
        let reg = self.root_reg(&[Region::new(pc.ipa, POWER_CTRL_MMIO_SIZE)])?;
        let node = self.begin(&path, name)?;
        self.string(&path, "compatible", "hyp,gdsc-controller")?;
        self.prop(&path, "reg", &reg)?;
        self.prop(&path, "#power-domain-cells", &1u32.to_be_bytes())?;
        self.prop(&path, "hyp,domains", &pc.domains.to_be_bytes())?;
        self.end(&path, node)
    }

    /// Emits root child `i` according to its role (`i` is 0 for a node the host lacks).
    fn child(&mut self, role: Role, i: usize) -> Result<(), DtError> {
        match role {
            Role::Chosen => self.chosen(i),
            Role::Aliases => self.aliases(i),
            Role::Cpus => self.cpus(i),
            Role::Psci => self.psci(i),
            Role::Memory => self.memory(),
            Role::ReservedMemory => Ok(()),
            Role::Other if self.plan.keep[i] => self.subtree(i),
            Role::Other => Ok(()),
        }
    }

    /// Copies kept node `i`, its properties and its kept children.
    fn subtree(&mut self, i: usize) -> Result<(), DtError> {
        let t = self.t;
        let path = t.path(i);
        let node = self.begin(path, t.name(i))?;
        let gic = is_gic(t, i);
        for (name, value) in t.properties(i) {
            if name == "iommus" && !self.plan.iommus_kept(t, value) {
                continue;
            }
            if msi_prop(name) || (gic && gic_msi_prop(name)) {
                continue;
            }
            self.prop(path, name, value)?;
        }
        for &c in t.children(i) {
            if self.plan.keep[c] {
                self.subtree(c)?;
            }
        }
        self.end(path, node)
    }

    /// Whether a path-valued property (`stdout-path`, an alias) names a kept node.
    fn names_kept(&self, value: &[u8]) -> bool {
        let path = core::str::from_utf8(value)
            .unwrap_or_default()
            .trim_end_matches('\0');
        self.t.resolve_path(path).is_some_and(|n| self.plan.keep[n])
    }

    fn chosen(&mut self, i: usize) -> Result<(), DtError> {
        let t = self.t;
        let node = self.begin("/chosen", "chosen")?;
        let mut stdout = false;
        let probe_only = self.spec.keep_pci && self.spec.pci_probe_only;
        let host_props = if i == 0 {
            Vec::new()
        } else {
            t.properties(i).collect()
        };
        for (name, value) in host_props {
            let skip = match name {
                "bootargs" => self.spec.bootargs.is_some(),
                "stdout-path" | "linux,stdout-path" => !self.names_kept(value),
                "linux,pci-probe-only" => probe_only,
                _ => chosen_prop_dropped(name),
            };
            if !skip {
                stdout |= name == "stdout-path";
                self.prop("/chosen", name, value)?;
            }
        }
        if let Some(args) = &self.spec.bootargs {
            self.string("/chosen", "bootargs", args)?;
        }
        if let (false, Some(console)) = (stdout, self.plan.console) {
            self.string("/chosen", "stdout-path", t.path(console))?;
        }
        if let Some((start, end)) = self.spec.initrd {
            self.prop("/chosen", "linux,initrd-start", &start.to_be_bytes())?;
            self.prop("/chosen", "linux,initrd-end", &end.to_be_bytes())?;
        }
        if probe_only {
            self.prop("/chosen", "linux,pci-probe-only", &1u32.to_be_bytes())?;
        }
        if i != 0 {
            for &c in t.children(i) {
                if self.plan.keep[c] {
                    self.subtree(c)?;
                }
            }
        }
        self.end("/chosen", node)
    }

    fn aliases(&mut self, i: usize) -> Result<(), DtError> {
        let kept: Vec<_> = self
            .t
            .properties(i)
            .filter(|(_, v)| self.names_kept(v))
            .collect();
        if kept.is_empty() {
            return Ok(());
        }
        let node = self.begin("/aliases", "aliases")?;
        for (name, value) in kept {
            self.prop("/aliases", name, value)?;
        }
        self.end("/aliases", node)
    }

    fn cpus(&mut self, i: usize) -> Result<(), DtError> {
        let t = self.t;
        let host: Vec<usize> = if i == 0 {
            Vec::new()
        } else {
            t.children(i)
                .iter()
                .copied()
                .filter(|&c| t.device_type_is(c, "cpu"))
                .collect()
        };
        let compatible = host
            .first()
            .and_then(|&c| t.prop(c, "compatible"))
            .unwrap_or(b"arm,armv8\0");
        let node = self.begin("/cpus", "cpus")?;
        self.prop("/cpus", "#address-cells", &1u32.to_be_bytes())?;
        self.prop("/cpus", "#size-cells", &0u32.to_be_bytes())?;
        for n in 0..self.spec.vcpus {
            let path = format!("/cpus/cpu@{n:x}");
            let cpu = self.begin(&path, &path[6..])?;
            self.string(&path, "device_type", "cpu")?;
            self.prop(&path, "compatible", compatible)?;
            self.prop(&path, "reg", &(n as u32).to_be_bytes())?;
            self.string(&path, "enable-method", "psci")?;
            if let Some(phandle) = host.get(n).and_then(|&c| t.prop(c, "phandle")) {
                self.prop(&path, "phandle", phandle)?;
            }
            self.end(&path, cpu)?;
        }
        self.end("/cpus", node)
    }

    fn psci(&mut self, i: usize) -> Result<(), DtError> {
        let name = if i == 0 { "psci" } else { self.t.name(i) };
        let path = format!("/{name}");
        let node = self.begin(&path, name)?;
        self.prop(&path, "compatible", b"arm,psci-1.0\0arm,psci-0.2\0")?;
        self.string(&path, "method", self.spec.psci_method)?;
        self.end(&path, node)
    }

    fn memory(&mut self) -> Result<(), DtError> {
        for region in &self.spec.memory {
            let path = format!("/memory@{:x}", region.base);
            let reg = self.root_reg(core::slice::from_ref(region))?;
            let node = self.begin(&path, &path[1..])?;
            self.string(&path, "device_type", "memory")?;
            self.prop(&path, "reg", &reg)?;
            self.end(&path, node)?;
        }
        Ok(())
    }

    fn reserved_memory(&mut self) -> Result<(), DtError> {
        const PATH: &str = "/reserved-memory";
        let (ac, sc) = (
            self.t.address_cells(0)? as u32,
            self.t.size_cells(0)? as u32,
        );
        let node = self.begin(PATH, &PATH[1..])?;
        self.prop(PATH, "#address-cells", &ac.to_be_bytes())?;
        self.prop(PATH, "#size-cells", &sc.to_be_bytes())?;
        self.prop(PATH, "ranges", &[])?;
        for region in &self.spec.reserved {
            let path = format!("{PATH}/guest-reserved@{:x}", region.base);
            let reg = self.root_reg(core::slice::from_ref(region))?;
            let child = self.begin(&path, &path[PATH.len() + 1..])?;
            self.prop(&path, "reg", &reg)?;
            self.prop(&path, "no-map", &[])?;
            self.end(&path, child)?;
        }
        self.end(PATH, node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dt::machine::{Conduit, parse};
    use crate::dt::testutil::{Builder, QEMU_VIRT};

    const MIB: u64 = 1 << 20;

    fn selftest_spec() -> GuestSpec {
        GuestSpec {
            vcpus: 2,
            memory: alloc::vec![Region::new(0x8000_0000, 64 * MIB)],
            console: Some(0x0900_0000),
            bootargs: Some("selftest.tests=all".into()),
            ..GuestSpec::default()
        }
    }

    /// Names of every node in a blob, via the `fdt` crate.
    fn node_names(dtb: &[u8]) -> Vec<String> {
        let fdt = fdt::Fdt::new(dtb).unwrap();
        fdt.all_nodes().map(|n| String::from(n.name)).collect()
    }

    fn prop_u32(dtb: &[u8], path: &str, prop: &str) -> Option<u32> {
        let fdt = fdt::Fdt::new(dtb).unwrap();
        let value = fdt.find_node(path)?.property(prop)?.value;
        Some(u32::from_be_bytes(value.try_into().ok()?))
    }

    #[test]
    fn selftest_guest_from_qemu_virt() {
        let dtb = derive_guest(QEMU_VIRT, &selftest_spec()).unwrap();
        let m = parse(&dtb).unwrap();
        let mpidrs: Vec<_> = m.cpus.iter().map(|c| c.mpidr).collect();
        assert_eq!(mpidrs, [0, 1]);
        assert_eq!(m.memory, [Region::new(0x8000_0000, 64 * MIB)]);
        assert_eq!(m.bootargs.as_deref(), Some("selftest.tests=all"));
        assert_eq!(m.psci.unwrap().method, Conduit::Hvc);
        assert_eq!(m.uart.unwrap().base, 0x0900_0000);
        assert!(m.smmus.is_empty() && m.pcie.is_none());
        // No ITS until it is virtualised.
        assert_eq!(m.gic.its, None);
        assert!(m.timer.is_some() && m.reserved.is_empty());
        let names = node_names(&dtb);
        for gone in [
            "virtio_mmio",
            "flash",
            "pcie",
            "smmuv3",
            "fw-cfg",
            "platform-bus",
            "gpio-keys",
            "pl061",
            "pl031",
            "cpu-map",
            "pmu",
            "its",
        ] {
            assert!(
                !names.iter().any(|n| n.starts_with(gone)),
                "{gone} kept: {names:?}"
            );
        }
        for kept in [
            "memory@80000000",
            "apb-pclk",
            "timer",
            "intc@8000000",
            "aliases",
        ] {
            assert!(names.iter().any(|n| n == kept), "{kept} missing: {names:?}");
        }
        // The GIC keeps its phandle, and the root still points at it.
        assert_eq!(prop_u32(&dtb, "/intc@8000000", "phandle"), Some(0x8005));
        assert_eq!(prop_u32(&dtb, "/", "interrupt-parent"), Some(0x8005));
        assert_eq!(prop_u32(&dtb, "/cpus/cpu@1", "phandle"), Some(0x8003));
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        let chosen = fdt.find_node("/chosen").unwrap();
        assert!(chosen.property("kaslr-seed").is_none() && chosen.property("rng-seed").is_none());
        assert_eq!(
            chosen.property("stdout-path").unwrap().as_str(),
            Some("/pl011@9000000")
        );
        let psci = fdt.find_node("/psci").unwrap();
        assert_eq!(
            psci.property("compatible").unwrap().value,
            b"arm,psci-1.0\0arm,psci-0.2\0"
        );
        assert_eq!(
            fdt.find_node("/cpus/cpu@0")
                .unwrap()
                .property("compatible")
                .unwrap()
                .as_str(),
            Some("arm,cortex-a57")
        );
    }

    #[test]
    fn host_bootargs_survive_when_not_replaced() {
        // A "host" blob with bootargs: QEMU's, passed through derive_guest once with them set.
        let host = GuestSpec {
            bootargs: Some("console=ttyAMA0 loglevel=8".into()),
            vcpus: 4,
            ..selftest_spec()
        };
        let host_dtb = derive_guest(QEMU_VIRT, &host).unwrap();
        let guest = derive_guest(
            &host_dtb,
            &GuestSpec {
                bootargs: None,
                ..selftest_spec()
            },
        )
        .unwrap();
        let m = parse(&guest).unwrap();
        assert_eq!(m.bootargs.as_deref(), Some("console=ttyAMA0 loglevel=8"));
        assert_eq!(m.cpus.len(), 2);
    }

    #[test]
    fn device_in_spec_is_kept() {
        let spec = GuestSpec {
            devices: alloc::vec![Region::new(0x0901_0000, 0x1000)],
            ..selftest_spec()
        };
        let dtb = derive_guest(QEMU_VIRT, &spec).unwrap();
        let names = node_names(&dtb);
        assert!(names.iter().any(|n| n == "pl031@9010000"), "{names:?}");
        assert!(!names.iter().any(|n| n.starts_with("pl061")), "{names:?}");
        // Its clock provider is still there, so the reference resolves.
        assert_eq!(
            prop_u32(&dtb, "/pl031@9010000", "clocks"),
            prop_u32(&dtb, "/apb-pclk", "phandle")
        );
    }

    /// Checks that every phandle reference of the common kinds in `dtb` (`interrupt-parent`,
    /// `interrupt-map`, `iommu-map`, `iommus`, `clocks`) names a node of `dtb`; returns how many
    /// references were checked.
    fn check_refs(dtb: &[u8]) -> usize {
        let blob = blob::check(dtb).unwrap();
        let fdt = blob.open().unwrap();
        let t = Tree::new(&fdt).unwrap();
        let cells = |i: usize, name: &str| t.cells_prop(i, name).unwrap().unwrap_or_default();
        let target = |i: usize, phandle: u32| {
            t.by_phandle(phandle)
                .unwrap_or_else(|| panic!("{}: phandle {phandle:#x} dangles", t.path(i)))
        };
        let count = |i: usize, name: &str| t.u32_prop(i, name).unwrap().unwrap_or(0) as usize;
        let mut checked = 0;
        for i in 0..t.nodes.len() {
            if let Some(p) = t.u32_prop(i, "interrupt-parent").unwrap() {
                let parent = target(i, p);
                assert!(t.prop(parent, "interrupt-controller").is_some());
                checked += 1;
            }
            // <child-unit-address child-irq phandle parent-unit-address parent-irq>...
            let map = cells(i, "interrupt-map");
            let child = t.address_cells(i).unwrap() + count(i, "#interrupt-cells");
            let mut rest = &map[..];
            while !rest.is_empty() {
                let parent = target(i, rest[child]);
                assert!(t.prop(parent, "interrupt-controller").is_some());
                let parent_cells =
                    count(parent, "#address-cells") + count(parent, "#interrupt-cells");
                rest = &rest[child + 1 + parent_cells..];
                checked += 1;
            }
            // <rid-base phandle iommu-specifier length>...
            let map = cells(i, "iommu-map");
            let mut rest = &map[..];
            while !rest.is_empty() {
                let iommu = target(i, rest[1]);
                rest = &rest[3 + count(iommu, "#iommu-cells")..];
                checked += 1;
            }
            for (name, cells_name) in [("iommus", "#iommu-cells"), ("clocks", "#clock-cells")] {
                let list = cells(i, name);
                let mut rest = &list[..];
                while !rest.is_empty() {
                    let provider = target(i, rest[0]);
                    rest = &rest[1 + count(provider, cells_name)..];
                    checked += 1;
                }
            }
        }
        checked
    }

    fn linux_spec() -> GuestSpec {
        GuestSpec {
            keep_pci: true,
            pci_probe_only: true,
            initrd: Some((0x8200_0000, 0x8234_5679)),
            bootargs: Some("console=ttyAMA0".into()),
            ..selftest_spec()
        }
    }

    #[test]
    fn keep_pci_keeps_pcie_and_smmu() {
        let dtb = derive_guest(QEMU_VIRT, &linux_spec()).unwrap();
        let m = parse(&dtb).unwrap();
        assert_eq!(m.smmus.len(), 1);
        let pcie = m.pcie.as_ref().unwrap();
        assert_eq!(pcie.iommu_map[0].smmu_phandle, m.smmus[0].phandle.unwrap());
        // No MSIs: the ITS is gone and nothing names an MSI controller.
        assert_eq!(m.gic.its, None);
        let names = node_names(&dtb);
        assert!(!names.iter().any(|n| n.starts_with("its")), "{names:?}");
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        for node in fdt.all_nodes() {
            for prop in node.properties() {
                assert!(
                    !prop.name.starts_with("msi-") && !prop.name.starts_with("mbi-"),
                    "{}: {} kept",
                    node.name,
                    prop.name
                );
                assert_ne!(prop.name, "#msi-cells", "{}", node.name);
            }
        }
        // Wired interrupts instead: the SMMU's named SPIs and the PCIe host's INTx map.
        let smmu = fdt.find_node("/smmuv3@9050000").unwrap();
        assert_eq!(m.smmus[0].irqs.len(), 4);
        assert_eq!(
            smmu.property("interrupt-names").unwrap().value,
            b"eventq\0priq\0cmdq-sync\0gerror\0"
        );
        let pcie_node = fdt.find_node("/pcie@10000000").unwrap();
        let map = pcie_node.property("interrupt-map").unwrap().value;
        // 16 entries of 10 cells, the 5th naming the GIC.
        assert_eq!(map.len(), 16 * 10 * 4);
        let gic = prop_u32(&dtb, "/intc@8000000", "phandle").unwrap();
        for entry in map.chunks(40) {
            assert_eq!(u32::from_be_bytes(entry[16..20].try_into().unwrap()), gic);
        }
        assert!(pcie_node.property("interrupt-map-mask").is_some());
        // The GIC keeps its redistributor description as is.
        assert_eq!(
            prop_u32(&dtb, "/intc@8000000", "#redistributor-regions"),
            Some(1)
        );
        let host = parse(QEMU_VIRT).unwrap();
        assert_eq!(
            m.gic,
            crate::dt::GicV3 {
                its: None,
                ..host.gic
            }
        );
        assert_eq!(m.smmus, host.smmus);
        // Every reference still resolves (to kept nodes: they are all in the guest tree): at
        // least the 16 `interrupt-map` entries, the root's `interrupt-parent` and `iommu-map`.
        let refs = check_refs(&dtb);
        assert!(refs >= 18, "only {refs} references checked");

        let chosen = fdt.find_node("/chosen").unwrap();
        assert_eq!(prop_u32(&dtb, "/chosen", "linux,pci-probe-only"), Some(1));
        let u64_prop = |name: &str| {
            let value = chosen.property(name).unwrap().value;
            u64::from_be_bytes(value.try_into().unwrap())
        };
        assert_eq!(u64_prop("linux,initrd-start"), 0x8200_0000);
        assert_eq!(u64_prop("linux,initrd-end"), 0x8234_5679);
        assert_eq!(m.bootargs.as_deref(), Some("console=ttyAMA0"));
    }

    #[test]
    fn selftest_guest_refs_resolve() {
        let dtb = derive_guest(QEMU_VIRT, &selftest_spec()).unwrap();
        assert!(check_refs(&dtb) > 0);
        // Neither initrd nor probe-only unless asked for.
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        let chosen = fdt.find_node("/chosen").unwrap();
        assert!(chosen.properties().all(|p| !p.name.starts_with("linux,")));
    }

    #[test]
    fn probe_only_needs_pci_and_replaces_the_hosts() {
        // Without the PCIe host there is nothing to probe.
        let spec = GuestSpec {
            keep_pci: false,
            ..linux_spec()
        };
        let dtb = derive_guest(QEMU_VIRT, &spec).unwrap();
        assert_eq!(prop_u32(&dtb, "/chosen", "linux,pci-probe-only"), None);
        assert!(!node_names(&dtb).iter().any(|n| n.starts_with("pcie")));

        // A host value of 0 is replaced, never duplicated; without the flag it is passed on.
        let mut b = Builder::new();
        b.node("chosen", |b| {
            b.u32("linux,pci-probe-only", 0);
        });
        let host = b.finish();
        let spec = GuestSpec {
            console: None,
            initrd: None,
            ..linux_spec()
        };
        let dtb = derive_guest(&host, &spec).unwrap();
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        let chosen = fdt.find_node("/chosen").unwrap();
        let probe: Vec<_> = chosen
            .properties()
            .filter(|p| p.name == "linux,pci-probe-only")
            .map(|p| p.value)
            .collect();
        assert_eq!(probe, [&1u32.to_be_bytes()[..]]);
        let kept = GuestSpec {
            pci_probe_only: false,
            ..spec
        };
        let dtb = derive_guest(&host, &kept).unwrap();
        assert_eq!(prop_u32(&dtb, "/chosen", "linux,pci-probe-only"), Some(0));
    }

    #[test]
    fn its_and_msi_dropped_elsewhere() {
        // An ITS outside the GIC, a platform device with msi-parent, and a GIC offering MBIs.
        let mut b = Builder::new();
        b.u32("interrupt-parent", 1);
        b.node("intc@8000000", |b| {
            b.string("compatible", "arm,gic-v3").cells(
                "reg",
                &[0, 0x0800_0000, 0, 0x1_0000, 0, 0x080a_0000, 0, 0x2_0000],
            );
            b.u32("#interrupt-cells", 3).empty("interrupt-controller");
            b.empty("msi-controller").cells("mbi-ranges", &[64, 64]);
            b.u32("redistributor-stride", 0x4_0000);
            b.u32("phandle", 1);
        });
        b.node("its@8100000", |b| {
            b.string("compatible", "arm,gic-v3-its")
                .cells("reg", &[0, 0x0810_0000, 0, 0x2_0000]);
            b.empty("msi-controller")
                .u32("#msi-cells", 1)
                .u32("phandle", 2);
        });
        b.node("dma@9000000", |b| {
            b.cells("reg", &[0, 0x0900_0000, 0, 0x1000])
                .u32("msi-parent", 2)
                .cells("interrupts", &[0, 5, 4]);
        });
        let spec = GuestSpec {
            console: None,
            devices: alloc::vec![Region::new(0x0800_0000, 0x200_0000)],
            ..selftest_spec()
        };
        let dtb = derive_guest(&b.finish(), &spec).unwrap();
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        assert!(fdt.find_node("/its@8100000").is_none());
        let dma = fdt.find_node("/dma@9000000").unwrap();
        assert!(dma.property("msi-parent").is_none() && dma.property("interrupts").is_some());
        let gic = fdt.find_node("/intc@8000000").unwrap();
        let names: Vec<_> = gic.properties().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "compatible",
                "reg",
                "#interrupt-cells",
                "interrupt-controller",
                "redistributor-stride",
                "phandle"
            ]
        );
        assert_eq!(check_refs(&dtb), 1);
    }

    #[test]
    fn reservations_and_no_console() {
        let spec = GuestSpec {
            reserved: alloc::vec![
                Region::new(0x8000_0000, 0x1000),
                Region::new(0x8100_0000, 0x2000)
            ],
            console: None,
            ..selftest_spec()
        };
        let dtb = derive_guest(QEMU_VIRT, &spec).unwrap();
        let m = parse(&dtb).unwrap();
        assert_eq!(
            m.reserved,
            [spec.reserved.clone(), spec.reserved.clone()].concat()
        );
        assert!(m.uart.is_none() && m.stdout_path.is_none());
        let names = node_names(&dtb);
        assert!(
            names.iter().any(|n| n == "guest-reserved@81000000"),
            "{names:?}"
        );
        assert!(!names.iter().any(|n| n == "aliases"), "{names:?}");
    }

    #[test]
    fn host_chosen_pointers_dropped() {
        let mut b = Builder::new();
        b.node("chosen", |b| {
            b.string("bootargs", "root=/dev/vda");
            b.cells("linux,initrd-start", &[0x4800_0000])
                .cells("linux,initrd-end", &[0x4810_0000]);
            b.cells("linux,uefi-system-table", &[0, 0x5000_0000]);
        });
        b.node("cpus", |b| {
            b.u32("#address-cells", 1).u32("#size-cells", 0);
            b.node("cpu@0", |b| {
                b.string("device_type", "cpu").u32("reg", 0);
            });
        });
        let guest = derive_guest(
            &b.finish(),
            &GuestSpec {
                console: None,
                bootargs: None,
                ..selftest_spec()
            },
        )
        .unwrap();
        let fdt = fdt::Fdt::new(&guest).unwrap();
        let chosen = fdt.find_node("/chosen").unwrap();
        let names: Vec<_> = chosen.properties().map(|p| p.name).collect();
        assert_eq!(names, ["bootargs"]);
        // The host had no /psci: the guest gets one anyway.
        assert_eq!(
            fdt.find_node("/psci")
                .unwrap()
                .property("method")
                .unwrap()
                .as_str(),
            Some("hvc")
        );
    }

    #[test]
    fn iommus_to_hidden_smmu_dropped() {
        let mut b = Builder::new();
        b.node("iommu@15000000", |b| {
            b.string("compatible", "arm,mmu-500")
                .cells("reg", &[0, 0x1500_0000, 0, 0x8_0000]);
            b.u32("#iommu-cells", 2).u32("phandle", 7);
        });
        b.node("soc", |b| {
            b.u32("#address-cells", 2)
                .u32("#size-cells", 2)
                .empty("ranges");
            b.node("usb@a600000", |b| {
                b.cells("reg", &[0, 0xa60_0000, 0, 0x1000])
                    .cells("iommus", &[7, 0x740, 0]);
            });
            b.node("i2c@a800000", |b| {
                b.cells("reg", &[0, 0xa80_0000, 0, 0x1000]);
            });
        });
        let spec = GuestSpec {
            console: None,
            devices: alloc::vec![Region::new(0xa60_0000, 0x1000)],
            ..selftest_spec()
        };
        let guest = derive_guest(&b.finish(), &spec).unwrap();
        let fdt = fdt::Fdt::new(&guest).unwrap();
        let usb = fdt.find_node("/soc/usb@a600000").unwrap();
        assert!(usb.property("iommus").is_none() && usb.property("reg").is_some());
        assert!(
            fdt.find_node("/soc/i2c@a800000").is_none()
                && fdt.find_node("/iommu@15000000").is_none()
        );
        assert!(fdt.find_node("/soc").unwrap().property("ranges").is_some());
    }

    #[test]
    fn power_controller_node() {
        let spec = GuestSpec {
            power_controller: Some(PowerCtrlNode {
                ipa: 0x0a00_0000,
                domains: 3,
            }),
            ..selftest_spec()
        };
        let dtb = derive_guest(QEMU_VIRT, &spec).unwrap();
        let fdt = fdt::Fdt::new(&dtb).unwrap();
        let pc = fdt.find_node("/power-controller@a000000").unwrap();
        assert_eq!(
            pc.property("compatible").unwrap().as_str(),
            Some("hyp,gdsc-controller")
        );
        // QEMU's root has #address-cells = #size-cells = 2.
        let cells = |v: &[u8]| -> Vec<u32> {
            v.chunks(4)
                .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
                .collect()
        };
        assert_eq!(
            cells(pc.property("reg").unwrap().value),
            [0, 0x0a00_0000, 0, 0x1000]
        );
        let mut reg = pc.reg().unwrap();
        let r = reg.next().unwrap();
        assert_eq!(
            (r.starting_address as u64, r.size),
            (0x0a00_0000, Some(0x1000))
        );
        assert!(reg.next().is_none());
        let path = "/power-controller@a000000";
        assert_eq!(prop_u32(&dtb, path, "#power-domain-cells"), Some(1));
        assert_eq!(prop_u32(&dtb, path, "hyp,domains"), Some(3));
        // Exactly one such node, and none without the spec asking for it.
        let names = node_names(&dtb);
        let count = names
            .iter()
            .filter(|n| n.starts_with("power-controller"))
            .count();
        assert_eq!(count, 1, "{names:?}");
        let plain = derive_guest(QEMU_VIRT, &selftest_spec()).unwrap();
        assert!(
            !node_names(&plain)
                .iter()
                .any(|n| n.starts_with("power-controller"))
        );

        // Zero domains is a spec error; a kept host node with the same name is one too.
        let none = GuestSpec {
            power_controller: Some(PowerCtrlNode {
                ipa: 0x0a00_0000,
                domains: 0,
            }),
            ..spec.clone()
        };
        assert_eq!(
            derive_guest(QEMU_VIRT, &none).unwrap_err().to_string(),
            "invalid guest spec: power controller without domains"
        );
        let mut b = Builder::new();
        b.node("power-controller@a000000", |b| {
            b.cells("reg", &[0, 0x0a00_0000, 0, 0x1000]);
        });
        let clash = GuestSpec {
            console: None,
            devices: alloc::vec![Region::new(0x0a00_0000, 0x1000)],
            ..spec
        };
        let msg = derive_guest(&b.finish(), &clash).unwrap_err().to_string();
        assert!(msg.contains("already has a node"), "{msg}");
    }

    #[test]
    fn spec_errors() {
        let err = |spec: GuestSpec| derive_guest(QEMU_VIRT, &spec).unwrap_err().to_string();
        assert_eq!(
            err(GuestSpec {
                vcpus: 0,
                ..selftest_spec()
            }),
            "invalid guest spec: vcpus = 0 is not in 1..=256"
        );
        assert_eq!(
            err(GuestSpec {
                console: Some(0x1234_0000),
                ..selftest_spec()
            }),
            "invalid guest spec: console 0x12340000: the host device tree has no PL011 there"
        );
        assert_eq!(
            err(GuestSpec {
                memory: Vec::new(),
                ..selftest_spec()
            }),
            "invalid guest spec: no memory regions"
        );
        let two = alloc::vec![
            Region::new(0x8000_0000, 0x2000),
            Region::new(0x8000_1000, 0x1000)
        ];
        assert_eq!(
            err(GuestSpec {
                memory: two.clone(),
                ..selftest_spec()
            }),
            "invalid guest spec: memory regions 0x80000000+0x2000 and 0x80001000+0x1000 overlap"
        );
        let msg = err(GuestSpec {
            reserved: two,
            ..selftest_spec()
        });
        assert!(msg.contains("overlapping"), "{msg}");
        for initrd in [
            (0x8100_0000, 0x8100_0000),
            (0x8100_0000, 0x80ff_0000),
            (0x7fff_f000, 0x8000_1000),
            (0x83ff_f000, 0x8400_1000),
        ] {
            assert_eq!(
                err(GuestSpec {
                    initrd: Some(initrd),
                    ..selftest_spec()
                }),
                format!(
                    "invalid guest spec: initrd {:#x}..{:#x} is empty or not inside the VM's memory",
                    initrd.0, initrd.1
                )
            );
        }
        // Adjacent memory regions together hold it; the end is exclusive.
        let split = GuestSpec {
            memory: alloc::vec![
                Region::new(0x8100_0000, 0x100_0000),
                Region::new(0x8000_0000, 0x100_0000)
            ],
            initrd: Some((0x80ff_f000, 0x8200_0000)),
            ..selftest_spec()
        };
        assert!(derive_guest(QEMU_VIRT, &split).is_ok());
        let e = derive_guest(&QEMU_VIRT[..100], &selftest_spec()).unwrap_err();
        assert!(matches!(e, DtError::NotFdt(_)), "{e}");
    }
}
