//! A minimal GICv3 driver, enough to take a device's SPIs by polling: the distributor with
//! affinity routing and Group 1 enabled, this vCPU's redistributor awake, the CPU interface
//! through the ICC_* system registers with every priority unmasked, and per SPI: Group 1, the
//! trigger the DT gives, a priority, routed to this vCPU, enabled.
//!
//! Interrupts stay masked in PSTATE (the guest never takes an IRQ exception): a caller polls
//! ICC_IAR1_EL1, which acknowledges the highest-priority pending Group 1 interrupt (or returns
//! [`SPURIOUS`]), and ends each acknowledged one with ICC_EOIR1_EL1 (EOImode = 0: the EOI also
//! deactivates it, so no ICC_DIR_EL1).
//!
//! Under the hypervisor this is its virtual GICv3 (emulated GICD/GICR, the hardware's virtual
//! CPU interface behind ICC_*: `hyp/src/vgic`, where ARE and DS read as 1 and every
//! interrupt is Group 1); on bare QEMU it is QEMU's GICv3 (single Security state, so the same
//! GICD_CTLR layout), which needs ARE, the group and the trigger written.
//!
//! Register layouts: Arm IHI 0069 (GICv3/v4), chapter 12.

use core::arch::asm;

use fdt::Fdt;
use fdt::node::FdtNode;

use crate::arch::{self, Deadline, wait_until};
use crate::pci::{cells, read32, write32, write64};
use crate::report::{Msg, ensure, fail};

/// What ICC_IAR1_EL1 returns when nothing is pending.
pub const SPURIOUS: u32 = 1023;

/// Distributor registers.
mod gicd {
    pub const CTLR: usize = 0x0000;
    pub const TYPER: usize = 0x0004;
    pub const IGROUPR: usize = 0x0080;
    pub const ISENABLER: usize = 0x0100;
    pub const ICENABLER: usize = 0x0180;
    pub const IPRIORITYR: usize = 0x0400;
    pub const ICFGR: usize = 0x0c00;
    pub const IROUTER: usize = 0x6000;

    /// GICD_CTLR in the single Security state view (DS = 1).
    pub const CTLR_ENABLE_GRP1: u32 = 1 << 1;
    pub const CTLR_ARE: u32 = 1 << 4;
    pub const CTLR_RWP: u32 = 1 << 31;
}

/// Redistributor registers (RD_base).
mod gicr {
    pub const TYPER: usize = 0x0008;
    pub const WAKER: usize = 0x0014;

    pub const TYPER_VLPIS: u32 = 1 << 1;
    pub const TYPER_LAST: u32 = 1 << 4;
    pub const WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
    pub const WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
    /// RD_base + SGI_base.
    pub const STRIDE: usize = 0x2_0000;
    /// With VLPIs: also VLPI_base and a reserved frame.
    pub const STRIDE_VLPI: usize = 0x4_0000;
}

/// Bounds of the register handshakes (RWP, ChildrenAsleep).
const TIMEOUT_MS: u64 = 100;
/// Redistributor regions looked at (`#redistributor-regions`).
const MAX_RD_REGIONS: usize = 4;

/// An interrupt from a DT `interrupts` property.
#[derive(Clone, Copy)]
pub struct Irq {
    pub intid: u32,
    /// Edge-triggered (flags = rising edge), else level.
    pub edge: bool,
}

/// The GIC node (`arm,gic-v3`) of the DT.
fn gic_node<'b, 'a>(fdt: &'b Fdt<'a>) -> Result<FdtNode<'b, 'a>, Msg> {
    match fdt.find_compatible(&["arm,gic-v3"]) {
        Some(n) => Ok(n),
        None => fail!("no arm,gic-v3 node in the DT"),
    }
}

fn phandle(node: FdtNode<'_, '_>) -> Option<u32> {
    node.property("phandle")
        .or_else(|| node.property("linux,phandle"))
        .and_then(|p| p.as_usize())
        .map(|p| p as u32)
}

/// `#interrupt-cells` of the GIC, after checking that `node`'s interrupt parent (its
/// `interrupt-parent`, else the root's) is the GIC.
fn gic_cells(fdt: &Fdt<'_>, node: FdtNode<'_, '_>) -> Result<usize, Msg> {
    let gic = gic_node(fdt)?;
    let parent = node
        .property("interrupt-parent")
        .or_else(|| {
            fdt.find_node("/")
                .and_then(|r| r.property("interrupt-parent"))
        })
        .and_then(|p| p.as_usize())
        .map(|p| p as u32);
    ensure!(
        parent.is_some() && parent == phandle(gic),
        "{}: its interrupt parent ({parent:?}) is not {} ({:?})",
        node.name,
        gic.name,
        phandle(gic)
    );
    let ncells = gic.interrupt_cells().unwrap_or(0);
    ensure!(
        (3..=4).contains(&ncells),
        "{}: #interrupt-cells = {ncells}, want 3 or 4",
        gic.name
    );
    Ok(ncells)
}

/// A GICv3 SPI or PPI specifier (`<type number flags>`) of `node`, `what` naming it in messages.
fn decode(node: FdtNode<'_, '_>, spec: [u32; 3], what: &str) -> Result<Irq, Msg> {
    let [kind, number, flags] = spec;
    let intid = match (kind, number) {
        (0, 0..=987) => 32 + number,
        (1, 0..=15) => 16 + number,
        _ => fail!(
            "{}: unsupported interrupt specifier <{kind} {number} {flags:#x}> ({what})",
            node.name
        ),
    };
    Ok(Irq {
        intid,
        edge: flags & 0xf == 1,
    })
}

/// The interrupt of `node` named `name` in its `interrupt-names`, if it has one: a GICv3 SPI
/// or PPI specifier (`<type number flags>`, type 0 = SPI → INTID 32 + number, 1 = PPI → 16 +
/// number; flags 1 = rising edge). The interrupt parent (the node's `interrupt-parent`, else the
/// root's) must be the GIC.
pub fn named_irq(fdt: &Fdt<'_>, node: FdtNode<'_, '_>, name: &str) -> Result<Option<Irq>, Msg> {
    let Some(names) = node.property("interrupt-names") else {
        fail!("{}: no interrupt-names", node.name);
    };
    let Some(index) = names
        .value
        .split(|&b| b == 0)
        .position(|n| n == name.as_bytes())
    else {
        return Ok(None);
    };
    let ncells = gic_cells(fdt, node)?;
    let Some(prop) = node.property("interrupts") else {
        fail!("{}: no interrupts", node.name);
    };
    let mut spec = cells(prop.value).skip(index * ncells);
    let (Some(kind), Some(number), Some(flags)) = (spec.next(), spec.next(), spec.next()) else {
        fail!("{}: no interrupts entry {index} ({name})", node.name);
    };
    decode(node, [kind, number, flags], name).map(Some)
}

/// Calls `f` with every interrupt of `node`'s `interrupts` (as [`named_irq`] decodes them), in
/// order.
pub fn irqs(fdt: &Fdt<'_>, node: FdtNode<'_, '_>, mut f: impl FnMut(Irq)) -> Result<(), Msg> {
    let ncells = gic_cells(fdt, node)?;
    let Some(prop) = node.property("interrupts") else {
        fail!("{}: no interrupts", node.name);
    };
    let all: &[u8] = prop.value;
    ensure!(
        !all.is_empty() && all.len().is_multiple_of(4 * ncells),
        "{}: interrupts is not a list of {ncells}-cell specifiers",
        node.name
    );
    for chunk in all.chunks_exact(4 * ncells) {
        let mut c = cells(chunk);
        let spec = [0; 3].map(|_| c.next().unwrap_or(0));
        f(decode(node, spec, "interrupts")?);
    }
    Ok(())
}

/// The GIC's `#address-cells` (the parent unit address in an `interrupt-map` naming it) and
/// `#interrupt-cells`, if phandle `ph` is the GIC's.
pub fn gic_map_cells(fdt: &Fdt<'_>, ph: u32) -> Result<Option<(usize, usize)>, Msg> {
    let gic = gic_node(fdt)?;
    if phandle(gic) != Some(ph) {
        return Ok(None);
    }
    let addr = gic
        .property("#address-cells")
        .and_then(|p| p.as_usize())
        .unwrap_or(0);
    Ok(Some((addr, gic.interrupt_cells().unwrap_or(0))))
}

/// The SPI of an `interrupt-map` parent specifier (`#interrupt-cells` cells) naming the GIC.
pub fn map_spi(node: FdtNode<'_, '_>, spec: &[u32]) -> Result<Irq, Msg> {
    ensure!(
        (3..=4).contains(&spec.len()),
        "{}: interrupt-map names the GIC with {} interrupt cells",
        node.name,
        spec.len()
    );
    decode(node, [spec[0], spec[1], spec[2]], "interrupt-map")
}

macro_rules! icc_read {
    ($name:ident, $reg:literal) => {
        #[doc = concat!("Reads `", $reg, "`.")]
        fn $name() -> u64 {
            let v: u64;
            // SAFETY: a GIC CPU interface register of this vCPU; reading it has no effect on
            // memory (ICC_IAR1_EL1 acknowledges an interrupt, which the caller then ends). Not
            // `nomem`: it stays ordered with the MMIO accesses around it.
            unsafe {
                asm!(concat!("mrs {}, ", $reg), out(reg) v, options(nostack, preserves_flags))
            };
            v
        }
    };
}

macro_rules! icc_write {
    ($name:ident, $reg:literal) => {
        #[doc = concat!("Writes `", $reg, "`, then `isb`.")]
        fn $name(v: u64) {
            // SAFETY: a GIC CPU interface register of this vCPU; PSTATE.I stays masked, so no
            // value written here makes the PE take an exception.
            unsafe {
                asm!(
                    concat!("msr ", $reg, ", {}"),
                    "isb",
                    in(reg) v,
                    options(nostack, preserves_flags)
                )
            };
        }
    };
}

icc_read!(icc_sre_el1, "icc_sre_el1");
icc_write!(set_icc_sre_el1, "icc_sre_el1");
icc_read!(icc_ctlr_el1, "icc_ctlr_el1");
icc_write!(set_icc_ctlr_el1, "icc_ctlr_el1");
icc_write!(set_icc_pmr_el1, "icc_pmr_el1");
icc_write!(set_icc_bpr1_el1, "icc_bpr1_el1");
icc_read!(icc_igrpen1_el1, "icc_igrpen1_el1");
icc_write!(set_icc_igrpen1_el1, "icc_igrpen1_el1");
icc_read!(icc_iar1_el1, "icc_iar1_el1");
icc_write!(set_icc_eoir1_el1, "icc_eoir1_el1");
icc_write!(set_icc_sgi1r_el1, "icc_sgi1r_el1");

/// Acknowledges the highest-priority pending Group 1 interrupt: its INTID, or [`SPURIOUS`]
/// (or another special INTID, 1020..=1022) when there is none. Every other value must be ended
/// with [`eoi`].
pub fn ack() -> u32 {
    (icc_iar1_el1() & 0xff_ffff) as u32
}

/// Ends an acknowledged interrupt (priority drop and, with EOImode = 0, deactivation).
pub fn eoi(intid: u32) {
    set_icc_eoir1_el1(u64::from(intid));
}

/// Generates SGIs: writes `value` to ICC_SGI1R_EL1 (INTID, target list or IRM, affinity).
pub fn send_sgi1r(value: u64) {
    set_icc_sgi1r_el1(value);
}

/// Whether `intid` is one of the special INTIDs (1020..=1023): nothing was acknowledged.
pub fn is_special(intid: u32) -> bool {
    (1020..=SPURIOUS).contains(&intid)
}

/// Polls ICC_IAR1_EL1 until it acknowledges an interrupt or `deadline` passes; the caller ends
/// what it returns with [`eoi`].
pub fn wait_ack(deadline: &Deadline) -> Option<u32> {
    loop {
        let intid = ack();
        if !is_special(intid) {
            return Some(intid);
        }
        if deadline.expired() {
            return None;
        }
        core::hint::spin_loop();
    }
}

/// The GIC as this vCPU uses it.
pub struct Gic {
    dist: usize,
    /// This vCPU's redistributor (RD_base).
    rd: usize,
    /// GICD_TYPER.ITLinesNumber: INTIDs below 32 × (N + 1) exist.
    lines: u32,
}

impl Gic {
    fn dread(&self, off: usize) -> u32 {
        // SAFETY: a 32-bit distributor register (Device memory in the boot map).
        unsafe { read32(self.dist + off) }
    }

    fn dwrite(&self, off: usize, v: u32) {
        // SAFETY: a 32-bit distributor register; the values written only configure interrupts
        // of this VM, which PSTATE.I keeps from being taken.
        unsafe { write32(self.dist + off, v) }
    }

    fn wait_rwp(&self) -> Result<(), Msg> {
        ensure!(
            wait_until(TIMEOUT_MS, || self.dread(gicd::CTLR) & gicd::CTLR_RWP == 0),
            "GICD_CTLR.RWP stuck"
        );
        Ok(())
    }

    /// Finds the GIC in the DT and sets up the distributor, this vCPU's redistributor and its
    /// CPU interface, with no interrupt enabled.
    pub fn init(fdt: &Fdt<'_>) -> Result<Self, Msg> {
        let node = gic_node(fdt)?;
        let Some(mut regs) = node.reg() else {
            fail!("{}: no usable reg", node.name);
        };
        let Some(dist) = regs.next() else {
            fail!("{}: no distributor in reg", node.name);
        };
        let nregions = node
            .property("#redistributor-regions")
            .and_then(|p| p.as_usize())
            .unwrap_or(1);
        ensure!(
            (1..=MAX_RD_REGIONS).contains(&nregions),
            "{}: #redistributor-regions = {nregions}",
            node.name
        );
        let mut rd_regions = [(0usize, 0usize); MAX_RD_REGIONS];
        for r in rd_regions.iter_mut().take(nregions) {
            let Some(reg) = regs.next() else {
                fail!(
                    "{}: fewer than {nregions} redistributor region(s)",
                    node.name
                );
            };
            *r = (reg.starting_address as usize, reg.size.unwrap_or(0));
        }
        let stride = node
            .property("redistributor-stride")
            .and_then(|p| p.as_usize());

        let mut gic = Gic {
            dist: dist.starting_address as usize,
            rd: 0,
            lines: 0,
        };
        gic.lines = gic.dread(gicd::TYPER) & 0x1f;

        // The CPU interface's system registers (RAO/WI where the hypervisor fixed SRE = 1).
        set_icc_sre_el1(icc_sre_el1() | 1);
        ensure!(
            icc_sre_el1() & 1 == 1,
            "ICC_SRE_EL1.SRE does not stick: no system register interface"
        );

        // Distributor: affinity routing (RAO under the hypervisor; on QEMU written while both
        // groups are disabled), then Group 1.
        let ctlr = gic.dread(gicd::CTLR);
        if ctlr & gicd::CTLR_ARE == 0 {
            gic.dwrite(gicd::CTLR, gicd::CTLR_ARE);
            gic.wait_rwp()?;
        }
        let want = gicd::CTLR_ARE | gicd::CTLR_ENABLE_GRP1;
        gic.dwrite(gicd::CTLR, (ctlr & !gicd::CTLR_RWP) | want);
        gic.wait_rwp()?;
        let ctlr = gic.dread(gicd::CTLR);
        ensure!(
            ctlr & want == want,
            "GICD_CTLR = {ctlr:#x} after enabling ARE and Group 1"
        );

        // This vCPU's redistributor: the one whose GICR_TYPER affinity is our MPIDR's.
        let mpidr = arch::my_mpidr();
        let aff = (((mpidr >> 32) & 0xff) << 24 | (mpidr & 0xff_ffff)) as u32;
        'regions: for &(base, size) in &rd_regions[..nregions] {
            let mut frame = base;
            while frame + gicr::STRIDE <= base + size {
                // SAFETY: GICR_TYPER of a redistributor inside the region the DT names,
                // read as two 32-bit halves.
                let (lo, hi) =
                    unsafe { (read32(frame + gicr::TYPER), read32(frame + gicr::TYPER + 4)) };
                if hi == aff {
                    gic.rd = frame;
                    break 'regions;
                }
                if lo & gicr::TYPER_LAST != 0 {
                    break;
                }
                frame += stride.unwrap_or(if lo & gicr::TYPER_VLPIS != 0 {
                    gicr::STRIDE_VLPI
                } else {
                    gicr::STRIDE
                });
            }
        }
        ensure!(
            gic.rd != 0,
            "no redistributor with affinity {aff:#x} (MPIDR {mpidr:#x})"
        );
        // Wake it: ProcessorSleep = 0, then ChildrenAsleep reads 0.
        // SAFETY: GICR_WAKER of this vCPU's redistributor.
        unsafe {
            let waker = read32(gic.rd + gicr::WAKER);
            write32(gic.rd + gicr::WAKER, waker & !gicr::WAKER_PROCESSOR_SLEEP);
        }
        ensure!(
            wait_until(TIMEOUT_MS, || {
                // SAFETY: as above.
                unsafe { read32(gic.rd + gicr::WAKER) & gicr::WAKER_CHILDREN_ASLEEP == 0 }
            }),
            "GICR_WAKER.ChildrenAsleep stays 1"
        );

        // CPU interface: every priority unmasked, no preemption grouping, EOImode = 0,
        // Group 1 on.
        set_icc_pmr_el1(0xff);
        set_icc_bpr1_el1(0);
        set_icc_ctlr_el1(icc_ctlr_el1() & !(1 << 1));
        set_icc_igrpen1_el1(1);
        ensure!(
            icc_igrpen1_el1() & 1 == 1,
            "ICC_IGRPEN1_EL1.Enable does not stick"
        );
        Ok(gic)
    }

    /// The distributor's address.
    pub fn dist(&self) -> usize {
        self.dist
    }

    /// This vCPU's redistributor (RD_base).
    pub fn redist(&self) -> usize {
        self.rd
    }

    /// Configures SPI `irq` (Group 1, its trigger, `priority`, routed to this vCPU) and enables
    /// it.
    pub fn enable_spi(&self, irq: Irq, priority: u8) -> Result<(), Msg> {
        let i = irq.intid;
        ensure!(
            (32..1020).contains(&i) && i < 32 * (self.lines + 1),
            "INTID {i} is not an SPI of this distributor (ITLinesNumber {})",
            self.lines
        );
        let (word, bit) = (4 * (i / 32) as usize, 1u32 << (i % 32));
        // Configuration changes only while it is disabled.
        self.disable_spi(i)?;
        self.dwrite(gicd::IGROUPR + word, self.dread(gicd::IGROUPR + word) | bit);
        let cfg = gicd::ICFGR + 4 * (i / 16) as usize;
        let edge = 2u32 << (2 * (i % 16));
        let old = self.dread(cfg);
        self.dwrite(cfg, if irq.edge { old | edge } else { old & !edge });
        let prio = gicd::IPRIORITYR + (i & !3) as usize;
        let shift = 8 * (i % 4);
        self.dwrite(
            prio,
            (self.dread(prio) & !(0xff << shift)) | (u32::from(priority) << shift),
        );
        // IRM = 0: this vCPU (Aff3 in bits 39:32, Aff2..Aff0 in 23:0, as in MPIDR).
        // SAFETY: GICD_IROUTER<i>, a 64-bit distributor register.
        unsafe { write64(self.dist + gicd::IROUTER + 8 * i as usize, arch::my_mpidr()) };
        self.dwrite(gicd::ISENABLER + word, bit);
        let enabled = self.dread(gicd::ISENABLER + word) & bit != 0;
        ensure!(
            enabled,
            "GICD_ISENABLER: INTID {i} does not read as enabled"
        );
        Ok(())
    }

    /// Disables SPI `intid` and waits for the distributor to have done so.
    pub fn disable_spi(&self, intid: u32) -> Result<(), Msg> {
        let (word, bit) = (4 * (intid / 32) as usize, 1u32 << (intid % 32));
        self.dwrite(gicd::ICENABLER + word, bit);
        self.wait_rwp()
    }
}
