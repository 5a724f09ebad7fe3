//! [`Machine`]: what the hypervisor needs to know about the hardware, read from the host DTB.
//!
//! Every field is plain owned data so the result can outlive the blob. Nodes with a `status`
//! other than `"okay"`/`"ok"` are ignored (CPUs excepted: see [`Cpu`]). Addresses are CPU
//! physical addresses: `reg` is read with the parent's `#address-cells`/`#size-cells` (2 and 1
//! when absent) and translated through the `ranges` of any bus between the node and `/`. On
//! QEMU `virt` every device sits directly under `/`, so no translation happens there; on SDM845
//! devices sit under `/soc@0`, whose `ranges` is an identity map.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use super::DtError;
use super::blob;
use super::tree::Tree;

/// A physical address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Region {
    /// First byte.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl Region {
    /// A region of `size` bytes at `base`.
    pub const fn new(base: u64, size: u64) -> Self {
        Self { base, size }
    }

    /// One past the last byte, or `None` if that overflows.
    pub fn end(&self) -> Option<u64> {
        self.base.checked_add(self.size)
    }

    /// Whether `other` lies entirely inside `self`.
    pub fn contains(&self, other: &Region) -> bool {
        match (self.end(), other.end()) {
            (Some(end), Some(other_end)) => other.base >= self.base && other_end <= end,
            _ => false,
        }
    }
}

/// The kind of a GIC interrupt, as in the first cell of a GIC interrupt specifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IrqKind {
    /// Shared peripheral interrupt (specifier type 0), INTID 32 + number.
    Spi,
    /// Private peripheral interrupt (specifier type 1), INTID 16 + number.
    Ppi,
}

/// A GIC interrupt as the device tree writes it: `<type number flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Irq {
    /// SPI or PPI.
    pub kind: IrqKind,
    /// The SPI or PPI number from the DT (not the INTID).
    pub number: u32,
    /// The flags cell: trigger type in bits 3:0 (1 = edge rising, 4 = level high), and for
    /// GICv2-style PPIs a CPU mask in bits 15:8.
    pub trigger: u32,
}

impl Smmu {
    /// The interrupt named `name` in `interrupt-names` (SMMUv3: `eventq`, `priq`, `cmdq-sync`,
    /// `gerror`), or the one at `fallback` in DT order when the node has no names.
    pub fn irq(&self, name: &str, fallback: usize) -> Option<Irq> {
        if self.irq_names.is_empty() {
            return self.irqs.get(fallback).copied();
        }
        let at = self.irq_names.iter().position(|n| n == name)?;
        self.irqs.get(at).copied()
    }
}

impl Irq {
    /// The GIC INTID: SPI n is 32 + n, PPI n is 16 + n.
    pub fn intid(&self) -> u32 {
        match self.kind {
            IrqKind::Spi => 32 + self.number,
            IrqKind::Ppi => 16 + self.number,
        }
    }
}

/// A CPU from `/cpus`. Nodes with `status = "fail..."` are skipped; `"disabled"` CPUs are kept
/// because for CPUs it means "parked, can be started" (Devicetree Specification 3.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cpu {
    /// Node path, e.g. `/cpus/cpu@0`.
    pub path: String,
    /// MPIDR affinity bits, from `reg`.
    pub mpidr: u64,
    /// `enable-method` (`"psci"`, `"spin-table"`), if given.
    pub enable_method: Option<String>,
}

/// The GICv3 (compatible `"arm,gic-v3"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GicV3 {
    /// Node path.
    pub path: String,
    /// Distributor.
    pub gicd: Region,
    /// Redistributor regions (`#redistributor-regions` of them, default 1).
    pub gicr: Vec<Region>,
    /// The first enabled ITS child (`"arm,gic-v3-its"`), if any.
    pub its: Option<Region>,
    /// The virtual-interface maintenance interrupt, if the node has `interrupts`.
    pub maintenance_irq: Option<Irq>,
}

/// UART programming models we know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UartKind {
    /// Arm PL011 (`"arm,pl011"`): QEMU `virt`.
    Pl011,
    /// Qualcomm GENI serial engine (`"qcom,geni-debug-uart"`, `"qcom,geni-uart"`): SDM845.
    QcomGeni,
}

/// The console UART.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uart {
    /// Node path.
    pub path: String,
    /// MMIO base.
    pub base: u64,
    /// MMIO size.
    pub size: u64,
    /// Programming model.
    pub kind: UartKind,
    /// Its first GIC interrupt, if any.
    pub irq: Option<Irq>,
}

/// How firmware services are called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Conduit {
    /// `smc #0`.
    Smc,
    /// `hvc #0`.
    Hvc,
}

/// The PSCI firmware node (compatible `"arm,psci*"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Psci {
    /// Conduit from `method`.
    pub method: Conduit,
    /// Node path.
    pub path: String,
}

/// The architected timer's interrupts (compatible `"arm,armv8-timer"`), in binding order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerIrqs {
    /// Secure physical timer.
    pub sec_phys: Irq,
    /// Non-secure physical timer (EL1).
    pub phys: Irq,
    /// Virtual timer (EL1).
    pub virt: Irq,
    /// EL2 physical timer: the hypervisor's own timer.
    pub hyp_phys: Irq,
    /// EL2 virtual timer (FEAT_VHE), when listed.
    pub hyp_virt: Option<Irq>,
}

/// SMMU architecture generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SmmuKind {
    /// SMMUv3 (`"arm,smmu-v3"`): QEMU `virt`.
    V3,
    /// SMMUv2 architecture, e.g. MMU-500 (`"arm,mmu-500"`, `"arm,smmu-v2"`,
    /// `"qcom,*-smmu-500"`): SDM845.
    V2,
}

/// An SMMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Smmu {
    /// Node path.
    pub path: String,
    /// MMIO base (first `reg` region).
    pub base: u64,
    /// MMIO size.
    pub size: u64,
    /// Architecture generation.
    pub kind: SmmuKind,
    /// GIC interrupts in DT order (for v3: eventq, priq, cmdq-sync, gerror on QEMU).
    pub irqs: Vec<Irq>,
    /// `interrupt-names`, one per entry of `irqs` when given (else empty).
    pub irq_names: Vec<String>,
    /// Its phandle, which `iommus`/`iommu-map` of masters refer to.
    pub phandle: Option<u32>,
}

/// PCI address space of a host-bridge window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PciSpace {
    /// I/O space (space code 1).
    Io,
    /// 32-bit memory space (space code 2).
    Mem32,
    /// 64-bit memory space (space code 3).
    Mem64,
}

/// One window of a PCI host bridge's `ranges`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciRange {
    /// Address space.
    pub space: PciSpace,
    /// First PCI bus address of the window.
    pub pci_addr: u64,
    /// CPU physical address it appears at.
    pub cpu_addr: u64,
    /// Window size.
    pub size: u64,
    /// The prefetchable bit (bit 30 of `phys.hi`).
    pub prefetchable: bool,
}

/// One `iommu-map` entry: requester IDs `rid_base..rid_base+len` reach SMMU `smmu_phandle` as
/// stream IDs `sid_base..sid_base+len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IommuMap {
    /// First requester ID (bus << 8 | devfn).
    pub rid_base: u32,
    /// Phandle of the SMMU.
    pub smmu_phandle: u32,
    /// First stream ID.
    pub sid_base: u32,
    /// Number of IDs.
    pub len: u32,
}

/// A generic ECAM PCIe host bridge (compatible `"pci-host-ecam-generic"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcieHost {
    /// Node path.
    pub path: String,
    /// Configuration space (ECAM).
    pub ecam: Region,
    /// First bus number (`bus-range`, default 0).
    pub bus_start: u8,
    /// Last bus number (`bus-range`, default 255).
    pub bus_end: u8,
    /// I/O and memory windows.
    pub ranges: Vec<PciRange>,
    /// Requester ID to stream ID mapping.
    pub iommu_map: Vec<IommuMap>,
    /// Legacy INTx routing (`interrupt-map` with its mask), for functions using INTx.
    pub intx: IntxMap,
}

/// A PCI host's `interrupt-map`: which GIC interrupt an INTx pin of a function raises.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IntxMap {
    /// `interrupt-map-mask` of `phys.hi` (bus/device/function bits) and of the pin.
    pub mask_hi: u32,
    pub mask_pin: u32,
    /// (masked `phys.hi`, masked pin, GIC interrupt).
    pub entries: Vec<(u32, u32, Irq)>,
}

impl IntxMap {
    /// The GIC interrupt that pin `pin` (1 = INTA .. 4 = INTD) of function `bdf` raises.
    pub fn lookup(&self, bdf: u16, pin: u8) -> Option<Irq> {
        let hi = (u32::from(bdf) << 8) & self.mask_hi;
        let pin = u32::from(pin) & self.mask_pin;
        self.entries
            .iter()
            .find(|(h, p, _)| *h == hi && *p == pin)
            .map(|(_, _, irq)| *irq)
    }
}

/// The machine as described by the host DTB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// RAM, from every `device_type = "memory"` node, zero-sized regions dropped.
    pub memory: Vec<Region>,
    /// The memory-reservation block followed by `/reserved-memory` children that have `reg`.
    pub reserved: Vec<Region>,
    /// CPUs in DT order.
    pub cpus: Vec<Cpu>,
    /// The interrupt controller.
    pub gic: GicV3,
    /// The console: `/chosen/stdout-path` if it names a UART we know, else the first PL011.
    pub uart: Option<Uart>,
    /// PSCI firmware.
    pub psci: Option<Psci>,
    /// Architected timer interrupts.
    pub timer: Option<TimerIrqs>,
    /// All SMMUs in DT order.
    pub smmus: Vec<Smmu>,
    /// The first generic ECAM PCIe host.
    pub pcie: Option<PcieHost>,
    /// `/chosen/bootargs`.
    pub bootargs: Option<String>,
    /// `/chosen/stdout-path`, verbatim (may carry an alias and `:options`).
    pub stdout_path: Option<String>,
}

/// Reads the machine description from a DTB.
///
/// Never panics: a bad header, a broken structure block or a missing or malformed node or
/// property gives a [`DtError`] naming the node and property.
pub fn parse(dtb: &[u8]) -> Result<Machine, DtError> {
    let blob = blob::check(dtb)?;
    let fdt = blob.open()?;
    let tree = Tree::new(&fdt)?;
    let mut reserved = blob.reservations.clone();
    reserved.extend(reserved_memory(&tree)?);
    let chosen = tree.find_path("/chosen");
    let chosen_str = |name: &str| match chosen {
        Some(c) => tree.str_prop(c, name).map(|s| s.map(String::from)),
        None => Ok(None),
    };
    Ok(Machine {
        memory: memory(&tree)?,
        reserved,
        cpus: cpus(&tree)?,
        gic: gic(&tree)?,
        uart: uart(&tree)?,
        psci: psci(&tree)?,
        timer: timer(&tree)?,
        smmus: smmus(&tree)?,
        pcie: pcie(&tree)?,
        bootargs: chosen_str("bootargs")?,
        stdout_path: chosen_str("stdout-path")?,
    })
}

/// The first `reg` region of node `i`.
fn first_reg(t: &Tree<'_>, i: usize) -> Result<Region, DtError> {
    // `Tree::reg` never returns an empty list.
    t.reg(i)?
        .first()
        .copied()
        .ok_or_else(|| DtError::prop(t.path(i), "reg", "empty"))
}

fn memory(t: &Tree<'_>) -> Result<Vec<Region>, DtError> {
    let mut out = Vec::new();
    for i in (0..t.nodes.len()).filter(|&i| t.device_type_is(i, "memory") && t.enabled(i)) {
        out.extend(t.reg(i)?.into_iter().filter(|r| r.size != 0));
    }
    if out.is_empty() {
        return Err(DtError::Missing(
            "memory node (device_type = \"memory\") with a non-empty `reg`".into(),
        ));
    }
    Ok(out)
}

/// `/reserved-memory` children with `reg`. Their `reg` is read untranslated: the binding
/// requires the node to map 1:1 (`ranges;`), and Linux reads it that way too.
fn reserved_memory(t: &Tree<'_>) -> Result<Vec<Region>, DtError> {
    let Some(rm) = t.find_path("/reserved-memory") else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for &child in t.children(rm) {
        if t.enabled(child) && t.prop(child, "reg").is_some() {
            out.extend(t.raw_reg(child)?);
        }
    }
    Ok(out)
}

fn cpus(t: &Tree<'_>) -> Result<Vec<Cpu>, DtError> {
    let node = t
        .find_path("/cpus")
        .ok_or_else(|| DtError::Missing("/cpus node".into()))?;
    let failed = |i: usize| matches!(t.str_prop(i, "status"), Ok(Some(s)) if s.starts_with("fail"));
    let mut out: Vec<Cpu> = Vec::new();
    for &i in t.children(node) {
        if !t.device_type_is(i, "cpu") || failed(i) {
            continue;
        }
        let mpidr = t.raw_reg(i)?[0].base;
        if let Some(prev) = out.iter().find(|c| c.mpidr == mpidr) {
            let msg = format!("MPIDR {mpidr:#x} repeats {}", prev.path);
            return Err(DtError::prop(t.path(i), "reg", msg));
        }
        let enable_method = t.str_prop(i, "enable-method")?.map(String::from);
        out.push(Cpu {
            path: t.path(i).into(),
            mpidr,
            enable_method,
        });
    }
    if out.is_empty() {
        return Err(DtError::node(
            t.path(node),
            "no cpu nodes (device_type = \"cpu\")",
        ));
    }
    Ok(out)
}

fn find_gic(t: &Tree<'_>) -> Result<usize, DtError> {
    if let Some(i) = t.find_compatible(|c| c == "arm,gic-v3").next() {
        return Ok(i);
    }
    let other_gic = (0..t.nodes.len()).find(|&i| {
        t.prop(i, "interrupt-controller").is_some() && t.is_compatible(i, |c| c.contains("gic"))
    });
    match other_gic {
        Some(i) => {
            let compat = t.compatible(i).join("\", \"");
            let msg = format!(
                "interrupt controller is \"{compat}\", but a GICv3 (\"arm,gic-v3\") is required"
            );
            Err(DtError::node(t.path(i), msg))
        }
        None => Err(DtError::Missing(
            "GICv3 interrupt controller (compatible \"arm,gic-v3\")".into(),
        )),
    }
}

fn gic(t: &Tree<'_>) -> Result<GicV3, DtError> {
    let i = find_gic(t)?;
    let nr_redist = t.u32_prop(i, "#redistributor-regions")?.unwrap_or(1) as usize;
    if nr_redist == 0 {
        return Err(DtError::prop(
            t.path(i),
            "#redistributor-regions",
            "must be at least 1",
        ));
    }
    let regs = t.reg(i)?;
    if regs.len() < 1 + nr_redist {
        let msg = format!(
            "expected at least {} regions (GICD, {nr_redist} GICR), found {}",
            1 + nr_redist,
            regs.len()
        );
        return Err(DtError::prop(t.path(i), "reg", msg));
    }
    let its_node = t
        .children(i)
        .iter()
        .copied()
        .find(|&c| t.enabled(c) && t.is_compatible(c, |s| s == "arm,gic-v3-its"));
    Ok(GicV3 {
        path: t.path(i).into(),
        gicd: regs[0],
        gicr: regs[1..1 + nr_redist].to_vec(),
        its: its_node.map(|c| first_reg(t, c)).transpose()?,
        maintenance_irq: t.gic_irqs(i)?.first().copied(),
    })
}

fn uart_kind(t: &Tree<'_>, i: usize) -> Option<UartKind> {
    let compat = t.compatible(i);
    if compat.contains(&"arm,pl011") {
        Some(UartKind::Pl011)
    } else if compat
        .iter()
        .any(|c| matches!(*c, "qcom,geni-debug-uart" | "qcom,geni-uart"))
    {
        Some(UartKind::QcomGeni)
    } else {
        None
    }
}

fn uart(t: &Tree<'_>) -> Result<Option<Uart>, DtError> {
    let stdout = match t.find_path("/chosen") {
        Some(c) => t
            .str_prop(c, "stdout-path")?
            .and_then(|p| t.resolve_path(p)),
        None => None,
    };
    let from_stdout = stdout
        .filter(|&i| t.enabled(i))
        .and_then(|i| Some((i, uart_kind(t, i)?)));
    let fallback = || {
        t.find_compatible(|c| c == "arm,pl011")
            .next()
            .map(|i| (i, UartKind::Pl011))
    };
    let Some((i, kind)) = from_stdout.or_else(fallback) else {
        return Ok(None);
    };
    let reg = first_reg(t, i)?;
    let irq = t.gic_irqs(i)?.first().copied();
    Ok(Some(Uart {
        path: t.path(i).into(),
        base: reg.base,
        size: reg.size,
        kind,
        irq,
    }))
}

fn psci(t: &Tree<'_>) -> Result<Option<Psci>, DtError> {
    let Some(i) = t.find_compatible(|c| c.starts_with("arm,psci")).next() else {
        return Ok(None);
    };
    let method = match t.str_prop(i, "method")? {
        Some("smc") => Conduit::Smc,
        Some("hvc") => Conduit::Hvc,
        Some(other) => {
            let msg = format!("expected \"smc\" or \"hvc\", found \"{other}\"");
            return Err(DtError::prop(t.path(i), "method", msg));
        }
        None => return Err(DtError::prop(t.path(i), "method", "missing")),
    };
    Ok(Some(Psci {
        method,
        path: t.path(i).into(),
    }))
}

fn timer(t: &Tree<'_>) -> Result<Option<TimerIrqs>, DtError> {
    let Some(i) = t.find_compatible(|c| c == "arm,armv8-timer").next() else {
        return Ok(None);
    };
    let specs = t.irq_specs(i)?;
    let names = ["sec-phys", "phys", "virt", "hyp-phys"];
    let mut irqs = [None; 4];
    for (slot, name) in names.iter().enumerate() {
        irqs[slot] = match specs.get(slot) {
            Some(Some(irq)) => Some(*irq),
            Some(None) => {
                let msg = format!("{name} interrupt is not routed to the GIC");
                return Err(DtError::prop(t.path(i), "interrupts", msg));
            }
            None => {
                let msg = format!(
                    "expected at least 4 interrupts (sec-phys, phys, virt, hyp-phys), found {}",
                    specs.len()
                );
                return Err(DtError::prop(t.path(i), "interrupts", msg));
            }
        };
    }
    let [Some(sec_phys), Some(phys), Some(virt), Some(hyp_phys)] = irqs else {
        return Err(DtError::prop(t.path(i), "interrupts", "incomplete"));
    };
    let hyp_virt = specs.get(4).copied().flatten();
    Ok(Some(TimerIrqs {
        sec_phys,
        phys,
        virt,
        hyp_phys,
        hyp_virt,
    }))
}

fn smmu_kind(t: &Tree<'_>, i: usize) -> Option<SmmuKind> {
    let compat = t.compatible(i);
    let v2 = |c: &&str| {
        matches!(*c, "arm,mmu-500" | "arm,smmu-v2" | "qcom,smmu-v2")
            || (c.starts_with("qcom,") && c.ends_with("-smmu-500"))
    };
    if compat.contains(&"arm,smmu-v3") {
        Some(SmmuKind::V3)
    } else if compat.iter().any(v2) {
        Some(SmmuKind::V2)
    } else {
        None
    }
}

fn smmus(t: &Tree<'_>) -> Result<Vec<Smmu>, DtError> {
    let mut out = Vec::new();
    for i in (0..t.nodes.len()).filter(|&i| t.enabled(i)) {
        let Some(kind) = smmu_kind(t, i) else {
            continue;
        };
        let reg = first_reg(t, i)?;
        out.push(Smmu {
            path: t.path(i).into(),
            base: reg.base,
            size: reg.size,
            kind,
            irqs: t.gic_irqs(i)?,
            irq_names: t
                .strings_prop(i, "interrupt-names")?
                .unwrap_or_default()
                .into_iter()
                .map(String::from)
                .collect(),
            phandle: t.phandle(i)?,
        });
    }
    Ok(out)
}

fn bus_range(t: &Tree<'_>, i: usize) -> Result<(u8, u8), DtError> {
    let Some(cells) = t.cells_prop(i, "bus-range")? else {
        return Ok((0, 255));
    };
    let bad = |msg: String| DtError::prop(t.path(i), "bus-range", msg);
    let [start, end] = cells[..] else {
        return Err(bad(format!("expected 2 cells, found {}", cells.len())));
    };
    match (u8::try_from(start), u8::try_from(end)) {
        (Ok(s), Ok(e)) if s <= e => Ok((s, e)),
        _ => Err(bad(format!(
            "<{start:#x} {end:#x}> is not an ascending range within 0..=255"
        ))),
    }
}

fn pci_ranges(t: &Tree<'_>, i: usize) -> Result<Vec<PciRange>, DtError> {
    let parent = t.nodes[i].parent.unwrap_or(0);
    let parent_ac = t.address_cells(parent)?;
    let (ac, sc) = (t.address_cells(i)?, t.size_cells(i)?);
    let bad = |msg: String| DtError::prop(t.path(i), "ranges", msg);
    if ac != 3 || sc != 2 || parent_ac == 0 || parent_ac > 2 {
        return Err(bad(format!(
            "need #address-cells = 3, #size-cells = 2 and a parent #address-cells of 1 or 2, found {ac}, {sc}, {parent_ac}"
        )));
    }
    let cells = t.cells_prop(i, "ranges")?.unwrap_or_default();
    let entry = 3 + parent_ac + 2;
    if !cells.len().is_multiple_of(entry) {
        return Err(bad(format!(
            "{} cells is not a multiple of {entry}",
            cells.len()
        )));
    }
    let wide = |c: &[u32]| c.iter().fold(0u64, |acc, &v| (acc << 32) | u64::from(v));
    let mut out = Vec::new();
    for e in cells.chunks_exact(entry) {
        let space = match (e[0] >> 24) & 3 {
            1 => PciSpace::Io,
            2 => PciSpace::Mem32,
            3 => PciSpace::Mem64,
            _ => {
                return Err(bad(format!(
                    "window with phys.hi {:#010x} is configuration space",
                    e[0]
                )));
            }
        };
        let size = wide(&e[3 + parent_ac..]);
        let cpu_addr = wide(&e[3..3 + parent_ac]);
        out.push(PciRange {
            space,
            pci_addr: wide(&e[1..3]),
            cpu_addr: t.translate(i, cpu_addr)?,
            size,
            prefetchable: e[0] & (1 << 30) != 0,
        });
    }
    Ok(out)
}

fn iommu_map(t: &Tree<'_>, i: usize) -> Result<Vec<IommuMap>, DtError> {
    let cells = t.cells_prop(i, "iommu-map")?.unwrap_or_default();
    if !cells.len().is_multiple_of(4) {
        let msg = format!(
            "{} cells is not a multiple of 4 (rid-base, phandle, sid-base, length)",
            cells.len()
        );
        return Err(DtError::prop(t.path(i), "iommu-map", msg));
    }
    let mut out = Vec::new();
    for e in cells.chunks_exact(4) {
        let smmu = t.resolve_phandle(i, "iommu-map", e[1])?;
        if t.u32_prop(smmu, "#iommu-cells")? != Some(1) {
            return Err(DtError::prop(
                t.path(smmu),
                "#iommu-cells",
                "must be 1 for an `iommu-map` target",
            ));
        }
        out.push(IommuMap {
            rid_base: e[0],
            smmu_phandle: e[1],
            sid_base: e[2],
            len: e[3],
        });
    }
    Ok(out)
}

fn pcie(t: &Tree<'_>) -> Result<Option<PcieHost>, DtError> {
    let Some(i) = t.find_compatible(|c| c == "pci-host-ecam-generic").next() else {
        return Ok(None);
    };
    let (bus_start, bus_end) = bus_range(t, i)?;
    Ok(Some(PcieHost {
        path: t.path(i).to_string(),
        ecam: first_reg(t, i)?,
        bus_start,
        bus_end,
        ranges: pci_ranges(t, i)?,
        iommu_map: iommu_map(t, i)?,
        intx: intx_map(t, i)?,
    }))
}

/// Parses `interrupt-map` (child: 3 address cells + 1 pin cell; parent: its phandle, its
/// `#address-cells`, its `#interrupt-cells`). Entries whose parent is not the GIC are skipped.
fn intx_map(t: &Tree<'_>, i: usize) -> Result<IntxMap, DtError> {
    const PROP: &str = "interrupt-map";
    let Some(cells) = t.cells_prop(i, PROP)? else {
        return Ok(IntxMap::default());
    };
    let mask = t.cells_prop(i, "interrupt-map-mask")?.unwrap_or_default();
    let (mask_hi, mask_pin) = match mask[..] {
        [hi, _, _, pin] => (hi, pin),
        [] => (u32::MAX, u32::MAX),
        _ => {
            let msg = format!("expected 4 cells, found {}", mask.len());
            return Err(DtError::prop(t.path(i), "interrupt-map-mask", msg));
        }
    };
    let mut out = IntxMap {
        mask_hi,
        mask_pin,
        entries: Vec::new(),
    };
    let mut rest = &cells[..];
    while !rest.is_empty() {
        let short = || DtError::prop(t.path(i), PROP, "truncated entry");
        let (child, tail) = rest.split_at_checked(5).ok_or_else(short)?;
        let parent = t.resolve_phandle(i, PROP, child[4])?;
        let pac = t.address_cells(parent)?;
        let pic = t.interrupt_cells(parent)?;
        let (spec, tail) = tail.split_at_checked(pac + pic).ok_or_else(short)?;
        rest = tail;
        if let Some(irq) = t.decode_irq(i, PROP, parent, &spec[pac..])? {
            out.entries
                .push((child[0] & mask_hi, child[3] & mask_pin, irq));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dt::testutil::{Builder, QEMU_VIRT};

    fn spi(number: u32, trigger: u32) -> Irq {
        Irq {
            kind: IrqKind::Spi,
            number,
            trigger,
        }
    }

    fn ppi(number: u32) -> Irq {
        Irq {
            kind: IrqKind::Ppi,
            number,
            trigger: 4,
        }
    }

    #[test]
    fn qemu_virt_pci_intx() {
        let m = parse(QEMU_VIRT).unwrap();
        let intx = &m.pcie.as_ref().unwrap().intx;
        assert_eq!(intx.entries.len(), 16);
        // QEMU virt swizzles INTx over 4 SPIs from 3: slot + pin - 1, mod 4.
        assert_eq!(intx.lookup(0x08, 1), Some(spi(4, 4)), "00:01.0 INTA");
        assert_eq!(intx.lookup(0x10, 1), Some(spi(5, 4)), "00:02.0 INTA");
        assert_eq!(intx.lookup(0x18, 1), Some(spi(6, 4)), "00:03.0 INTA");
        assert_eq!(intx.lookup(0x18, 2), Some(spi(3, 4)), "00:03.0 INTB");
        assert_eq!(intx.lookup(0x20, 1), Some(spi(3, 4)), "00:04.0 INTA wraps");
    }

    #[test]
    fn qemu_virt_memory_cpus_gic() {
        let m = parse(QEMU_VIRT).unwrap();
        assert_eq!(m.memory, [Region::new(0x4000_0000, 0x4000_0000)]);
        assert!(m.reserved.is_empty());
        let mpidrs: Vec<_> = m.cpus.iter().map(|c| c.mpidr).collect();
        assert_eq!(mpidrs, [0, 1, 2, 3]);
        assert_eq!(m.cpus[2].path, "/cpus/cpu@2");
        assert_eq!(m.cpus[0].enable_method.as_deref(), Some("psci"));
        assert_eq!(m.gic.path, "/intc@8000000");
        assert_eq!(m.gic.gicd, Region::new(0x0800_0000, 0x1_0000));
        assert_eq!(m.gic.gicr, [Region::new(0x080a_0000, 0xf6_0000)]);
        assert_eq!(m.gic.its, Some(Region::new(0x0808_0000, 0x2_0000)));
        let maint = m.gic.maintenance_irq.unwrap();
        assert_eq!((maint, maint.intid()), (ppi(9), 25));
    }

    #[test]
    fn qemu_virt_devices() {
        let m = parse(QEMU_VIRT).unwrap();
        let uart = m.uart.unwrap();
        assert_eq!(
            (uart.base, uart.size, uart.kind),
            (0x0900_0000, 0x1000, UartKind::Pl011)
        );
        assert_eq!(uart.irq.map(|i| i.intid()), Some(33));
        assert_eq!(
            m.psci.unwrap(),
            Psci {
                method: Conduit::Smc,
                path: "/psci".into()
            }
        );
        let timer = m.timer.unwrap();
        assert_eq!((timer.hyp_phys, timer.hyp_phys.intid()), (ppi(10), 26));
        assert_eq!(
            [timer.sec_phys, timer.phys, timer.virt],
            [ppi(13), ppi(14), ppi(11)]
        );
        assert_eq!(timer.hyp_virt, Some(ppi(12)));
        assert_eq!(m.bootargs, None);
        assert_eq!(m.stdout_path.as_deref(), Some("/pl011@9000000"));
    }

    #[test]
    fn qemu_virt_smmu_and_pcie() {
        let m = parse(QEMU_VIRT).unwrap();
        let [smmu] = &m.smmus[..] else {
            panic!("{:?}", m.smmus)
        };
        assert_eq!(
            (smmu.base, smmu.size, smmu.kind),
            (0x0905_0000, 0x2_0000, SmmuKind::V3)
        );
        assert_eq!(smmu.irqs, [spi(74, 1), spi(75, 1), spi(76, 1), spi(77, 1)]);
        let intids: Vec<_> = smmu.irqs.iter().map(Irq::intid).collect();
        assert_eq!(intids, [106, 107, 108, 109]);
        let pcie = m.pcie.unwrap();
        assert_eq!(pcie.ecam, Region::new(0x40_1000_0000, 0x1000_0000));
        assert_eq!((pcie.bus_start, pcie.bus_end), (0, 255));
        let map = IommuMap {
            rid_base: 0,
            smmu_phandle: smmu.phandle.unwrap(),
            sid_base: 0,
            len: 0x1_0000,
        };
        assert_eq!(pcie.iommu_map, [map]);
        let io = PciRange {
            space: PciSpace::Io,
            pci_addr: 0,
            cpu_addr: 0x3eff_0000,
            size: 0x1_0000,
            prefetchable: false,
        };
        let mem32 = PciRange {
            space: PciSpace::Mem32,
            pci_addr: 0x1000_0000,
            cpu_addr: 0x1000_0000,
            size: 0x2eff_0000,
            prefetchable: false,
        };
        let mem64 = PciRange {
            space: PciSpace::Mem64,
            pci_addr: 0x80_0000_0000,
            cpu_addr: 0x80_0000_0000,
            size: 0x80_0000_0000,
            prefetchable: false,
        };
        assert_eq!(pcie.ranges, [io, mem32, mem64]);
    }

    /// Knobs for a minimal machine DTB; the defaults parse.
    struct Mini {
        gic_reg: &'static [u32],
        gic_compat: &'static str,
        cpus: Option<u32>,
        psci_method: Option<&'static str>,
        stdout: &'static str,
    }

    impl Default for Mini {
        fn default() -> Self {
            Self {
                gic_reg: &[0, 0x800_0000, 0, 0x1_0000, 0, 0x80a_0000, 0, 0xf6_0000],
                gic_compat: "arm,gic-v3",
                cpus: Some(2),
                psci_method: Some("hvc"),
                stdout: "serial0:115200n8",
            }
        }
    }

    impl Mini {
        fn build(&self) -> Vec<u8> {
            let mut b = Builder::with_reservations(&[(0x4000_0000, 0x1000)]);
            b.u32("interrupt-parent", 1);
            b.node("chosen", |b| {
                b.string("stdout-path", self.stdout)
                    .string("bootargs", "console=ttyAMA0");
            });
            b.node("aliases", |b| {
                b.string("serial0", "/soc/serial@1000");
            });
            b.node("memory@40000000", |b| {
                b.string("device_type", "memory")
                    .cells("reg", &[0, 0x4000_0000, 0, 0x800_0000]);
            });
            b.node("reserved-memory", |b| {
                b.u32("#address-cells", 2)
                    .u32("#size-cells", 2)
                    .empty("ranges");
                b.node("fw@41000000", |b| {
                    b.cells("reg", &[0, 0x4100_0000, 0, 0x2000]).empty("no-map");
                });
            });
            if let Some(n) = self.cpus {
                b.node("cpus", |b| {
                    b.u32("#address-cells", 2).u32("#size-cells", 0);
                    for i in 0..n {
                        b.node(&format!("cpu@{}", i * 0x100), |b| {
                            b.string("device_type", "cpu").cells("reg", &[0, i * 0x100]);
                        });
                    }
                });
            }
            b.node("intc@8000000", |b| {
                b.string("compatible", self.gic_compat)
                    .empty("interrupt-controller");
                b.u32("#interrupt-cells", 3)
                    .u32("phandle", 1)
                    .cells("reg", self.gic_reg);
            });
            if let Some(method) = self.psci_method {
                b.node("psci", |b| {
                    b.strings("compatible", &["arm,psci-1.0", "arm,psci-0.2"])
                        .string("method", method);
                });
            }
            b.node("soc", |b| {
                b.u32("#address-cells", 1).u32("#size-cells", 1);
                b.cells("ranges", &[0, 0, 0x0a00_0000, 0x10_0000]);
                b.node("serial@1000", |b| {
                    b.string("compatible", "qcom,geni-debug-uart")
                        .cells("reg", &[0x1000, 0x4000]);
                    b.cells("interrupts", &[0, 356, 4]);
                });
                b.node("iommu@20000", |b| {
                    b.strings("compatible", &["qcom,sdm845-smmu-500", "arm,mmu-500"]);
                    b.cells("reg", &[0x2_0000, 0x1_0000])
                        .cells("interrupts", &[0, 65, 4, 0, 96, 4]);
                });
            });
            b.finish()
        }

        fn error(&self) -> String {
            parse(&self.build()).unwrap_err().to_string()
        }
    }

    #[test]
    fn minimal_machine_with_translation_and_aliases() {
        let m = parse(&Mini::default().build()).unwrap();
        assert_eq!(
            m.reserved,
            [
                Region::new(0x4000_0000, 0x1000),
                Region::new(0x4100_0000, 0x2000)
            ]
        );
        let mpidrs: Vec<_> = m.cpus.iter().map(|c| c.mpidr).collect();
        assert_eq!(mpidrs, [0, 0x100]);
        let uart = m.uart.unwrap();
        assert_eq!(
            (uart.path.as_str(), uart.base, uart.kind),
            ("/soc/serial@1000", 0x0a00_1000, UartKind::QcomGeni)
        );
        assert_eq!(uart.irq.map(|i| i.intid()), Some(388));
        let [smmu] = &m.smmus[..] else {
            panic!("{:?}", m.smmus)
        };
        assert_eq!(
            (smmu.base, smmu.kind, smmu.irqs.len()),
            (0x0a02_0000, SmmuKind::V2, 2)
        );
        assert_eq!(m.psci.unwrap().method, Conduit::Hvc);
        assert!(m.timer.is_none() && m.pcie.is_none());
        assert_eq!(m.bootargs.as_deref(), Some("console=ttyAMA0"));
    }

    #[test]
    fn error_bad_magic_and_truncated() {
        let mut dtb = QEMU_VIRT.to_vec();
        dtb[..4].copy_from_slice(&0xdeadbeefu32.to_be_bytes());
        let err = parse(&dtb).unwrap_err().to_string();
        assert_eq!(
            err,
            "not a device tree: bad magic 0xdeadbeef (expected 0xd00dfeed)"
        );
        let err = parse(&QEMU_VIRT[..0x800]).unwrap_err().to_string();
        assert!(err.starts_with("not a device tree: totalsize 0x"), "{err}");
        assert!(err.ends_with("does not fit the 0x800 bytes given"), "{err}");
    }

    #[test]
    fn error_gic_reg_one_region() {
        let mini = Mini {
            gic_reg: &[0, 0x800_0000, 0, 0x1_0000],
            ..Mini::default()
        };
        assert_eq!(
            mini.error(),
            "/intc@8000000: property `reg`: expected at least 2 regions (GICD, 1 GICR), found 1"
        );
        let mini = Mini {
            gic_reg: &[0, 0x800_0000, 0],
            ..Mini::default()
        };
        assert_eq!(
            mini.error(),
            "/intc@8000000: property `reg`: length 12 is not a non-zero multiple of 16 bytes (#address-cells = 2, #size-cells = 2)"
        );
    }

    #[test]
    fn error_gic_not_v3() {
        let mini = Mini {
            gic_compat: "arm,cortex-a15-gic",
            ..Mini::default()
        };
        assert_eq!(
            mini.error(),
            "/intc@8000000: interrupt controller is \"arm,cortex-a15-gic\", but a GICv3 (\"arm,gic-v3\") is required"
        );
    }

    #[test]
    fn error_cpus() {
        assert_eq!(
            Mini {
                cpus: None,
                ..Mini::default()
            }
            .error(),
            "device tree has no /cpus node"
        );
        assert_eq!(
            Mini {
                cpus: Some(0),
                ..Mini::default()
            }
            .error(),
            "/cpus: no cpu nodes (device_type = \"cpu\")"
        );
    }

    #[test]
    fn error_psci_method() {
        let mini = Mini {
            psci_method: Some("magic"),
            ..Mini::default()
        };
        assert_eq!(
            mini.error(),
            "/psci: property `method`: expected \"smc\" or \"hvc\", found \"magic\""
        );
    }

    #[test]
    fn stdout_path_fallback_to_pl011() {
        // A stdout-path naming nothing falls back to the first PL011 (none here).
        let m = parse(
            &Mini {
                stdout: "/nowhere",
                ..Mini::default()
            }
            .build(),
        )
        .unwrap();
        assert_eq!(m.uart, None);
    }

    #[test]
    fn error_interrupts_wrong_length() {
        let mut b = Builder::new();
        b.u32("interrupt-parent", 1);
        b.node("intc", |b| {
            b.string("compatible", "arm,gic-v3")
                .u32("#interrupt-cells", 3)
                .u32("phandle", 1);
            b.cells("interrupts", &[1, 9]);
        });
        let dtb = b.finish();
        let blob = blob::check(&dtb).unwrap();
        let fdt = blob.open().unwrap();
        let t = Tree::new(&fdt).unwrap();
        let err = t.irq_specs(1).unwrap_err().to_string();
        assert_eq!(
            err,
            "/intc: property `interrupts`: 2 cells is not a multiple of #interrupt-cells = 3 of /intc"
        );
    }

    /// Overwrites each structure-block word of the QEMU blob with a few nasty values: `parse`
    /// and `derive_guest` must return (Ok or Err) every time, never panic.
    #[test]
    fn corrupted_qemu_blob_never_panics() {
        let off = u32::from_be_bytes(QEMU_VIRT[8..12].try_into().unwrap()) as usize;
        let size = u32::from_be_bytes(QEMU_VIRT[36..40].try_into().unwrap()) as usize;
        let mut dtb = QEMU_VIRT.to_vec();
        let spec = crate::dt::GuestSpec {
            memory: alloc::vec![Region::new(0x8000_0000, 0x100_0000)],
            devices: alloc::vec![Region::new(0x0900_0000, 0x100_0000)],
            ..Default::default()
        };
        for at in (off..off + size).step_by(4) {
            let saved = [dtb[at], dtb[at + 1], dtb[at + 2], dtb[at + 3]];
            for value in [0u32, 0xffff_fff0] {
                dtb[at..at + 4].copy_from_slice(&value.to_be_bytes());
                let _ = parse(&dtb);
            }
            let _ = crate::dt::derive_guest(&dtb, &spec);
            dtb[at..at + 4].copy_from_slice(&saved);
        }
    }
}
