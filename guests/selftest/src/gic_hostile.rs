//! `gic-hostile`: a hostile guest writes nonsense to its GIC and cannot mask, route or trigger
//! any interrupt but its own. Under the hypervisor the GIC is the VM's virtual GICv3
//! (`hyp/src/vgic`: an emulated distributor and one emulated redistributor per vCPU, the
//! hardware's virtual CPU interface behind ICC_*); what the check asserts is what that vGIC
//! documents, register by register. Not run with `selftest.bare` (QEMU's own GIC has every SPI).
//!
//! Where it runs: after the hostile SMMU checks (`hostile.rs`) and right before `smmu-irq`
//! (`smmu_irq.rs`), on vCPU 0, with PSTATE.I masked (interrupts are only ever polled at
//! ICC_IAR1_EL1). `smmu-irq` then needs the physical SMMU event-queue interrupt, which the
//! hypervisor owns and which this guest just hammered *by number* (its own virtual SPI 106 has
//! the same INTID): that it still passes shows nothing written here reached the hardware. The
//! other VM runs the same check, its DMA checks and its own `smmu-irq` at the same time.
//!
//! The VM's own SPIs, from its DT: the INTx line of each PCI function it sees (the function's
//! Interrupt Pin through the host bridge's `interrupt-map`; forwarded from hardware), every
//! interrupt of the SMMU node (eventq, priq, cmdq-sync, gerror; virtual) and the console PL011's
//! (virtual). Every other INTID 32..1023 is *foreign*: the other VM's INTx, the SPIs nobody has,
//! the ones beyond ITLinesNumber.
//!
//! 1. Distributor, every SPI register bank up to INTID 1023 (so also beyond ITLinesNumber, which
//!    must cover the own SPIs): all-ones to ICENABLER, ICPENDR, ICACTIVER, IGROUPR, then
//!    ISPENDR, ISACTIVER, ISENABLER (everything triggered); IPRIORITYR words 0xffffffff, then
//!    every byte 0x00; ITARGETSR all ones; ICFGR all ones; every IROUTER<n> (n = 0..1023) the
//!    garbage [`GARBAGE`] (Aff3 = 0xff, IRM = 1, Aff0 = 0xff); GICD_CTLR all ones, 0, and back.
//!    Read back, foreign INTIDs are zero in every register (RAZ/WI), and the own SPIs show the
//!    writes as the vGIC implements them: enabled, pending, active, Group 1 (IGROUPR RAO/WI),
//!    priority 0xff read back as the implemented bits (a contiguous top mask, at least 4 bits:
//!    the vGIC keeps 5, 0xf8) and 0x00 as 0, ICFGR edge for the virtual SPIs and the DT's trigger
//!    for the forwarded INTx (read-only), IROUTER = Aff2..Aff0 of what was written (IRM and Aff3
//!    RAZ/WI: No1N = 1, A3V = 0), ITARGETSR RAZ (affinity routing). GICD_CTLR reads
//!    ARE | DS | EnableGrp1 after all ones (EnableGrp0, E1NWF RAZ/WI), ARE | DS after 0.
//! 2. Routing of the own SPIs: cleared (disabled, not pending, not active: every ISENABLER,
//!    ISPENDR, ISACTIVER word reads 0), priority 0xa0, the DT's trigger; IROUTER naming this
//!    vCPU and naming the VM's other vCPU reads back as written. With IROUTER naming no vCPU of
//!    the VM ([`GARBAGE`]), the own SPIs made pending and enabled are delivered nowhere (nothing
//!    at ICC_IAR1_EL1 for 20 ms: the vGIC routes such an SPI nowhere and keeps it pending);
//!    routed to this vCPU, each is acknowledged exactly once and nothing else is.
//! 3. RAZ/WI space in the frame: all ones to TYPER2, STATUSR, the message-based SPI registers
//!    (SETSPI/CLRSPI: GICD_TYPER.MBIS = 0), IGRPMODR, NSACR, SGIR, the SGI pending registers,
//!    INMIR, the extended-SPI banks, IROUTER<n>E, reserved and IMPLEMENTATION DEFINED offsets:
//!    no abort, reads 0; TYPER, IIDR and PIDR2 ignore the writes. SETSPI_NSR with every INTID
//!    32..1023 makes nothing pending. Accesses the vGIC cannot take abort (a synchronous external
//!    abort injected by the hypervisor, FAR = the address): a byte store to GICD_CTLR, a 64-bit
//!    load of it, and loads and stores just past the 64 KiB frame (GICD + 0x10000).
//! 4. Redistributors: the VM's frames (RD_base + SGI_base, 128 KiB each) are found by
//!    GICR_TYPER from the DT's region start up to GICR_TYPER.Last; there must be one per DT cpu,
//!    with its affinity. In each (this vCPU's and the other vCPU's, which this vCPU may program:
//!    same VM) the SGI/PPI registers are hammered like the distributor's (enable not on this
//!    vCPU's own frame, so nothing becomes deliverable here): pending and active all ones,
//!    IGROUPR0 RAO/WI, priorities masked as above, ICFGR0 read-only edge, ICFGR1 writable except
//!    the forwarded virtual timer PPI (read-only level; the DT timer node's third interrupt), LPI
//!    registers (GICR_CTLR, PROPBASER) and reserved offsets RAZ/WI. The next frame after the
//!    last one (on the host, another VM's or an unused CPU's redistributor) is not the VM's: a
//!    load of its GICR_TYPER and a store of all ones to its GICR_ISENABLER0 abort.
//! 5. SGIs through ICC_SGI1R_EL1 (SGI 15), checked in every frame's GICR_ISPENDR0: IRM = 1 makes
//!    it pending on every other vCPU of the VM and not on this one; a target list naming this
//!    VM's vCPUs on each of them; target lists naming affinities the VM does not have (Aff1 = 1,
//!    Aff2 = 1, Aff3 = 1, RS = 1 with Aff0 = 0..15, and Aff0 values past the VM's vCPUs) on none;
//!    GICD_SGIR (the legacy SGI register, RAZ/WI with affinity routing) on none. Whether another
//!    VM received one cannot be seen from here: the vGIC looks targets up among this VM's vCPUs
//!    only, and the other VM, whose checks run meanwhile, would see a stray SGI only as an
//!    interrupt it does not expect (its `smmu-irq` fails on any unexpected INTID).
//!
//! Afterwards, pass or fail: the own SPIs disabled, not pending, not active, routed to this
//! vCPU, priority 0xa0, the DT's trigger; GICD_CTLR as before; every frame's SGIs and PPIs not
//! pending or active, with their enables, priorities and PPI triggers as before; anything still
//! acknowledged at ICC_IAR1_EL1 ended. `smmu-irq` expects exactly that.
//!
//! Console: `selftest: gic-hostile: ...` lines with the GIC, the own SPIs and what each step saw.

use core::arch::asm;

use fdt::Fdt;
use fdt::node::FdtNode;

use crate::arch::{self, Deadline};
use crate::checks::{Probe, expect_sea, probe_read, probe_write};
use crate::console::println;
use crate::dt::{DtInfo, MAX_DT_CPUS};
use crate::exception;
use crate::gic::{self, Gic, Irq};
use crate::pci::{self, Bdf, HostBridge, cells};
use crate::report::{CheckResult, Msg, Report, ensure, fail};

pub const CHECK: &str = "gic-hostile";

/// IROUTER garbage: Aff3 = 0xff, IRM = 1, Aff2 = Aff1 = 0, Aff0 = 0xff. Names no vCPU of a VM
/// (vCPU i has affinity 0.0.0.i and a VM has fewer than 256).
const GARBAGE: u64 = (0xff << 32) | (1 << 31) | 0xff;
/// IROUTER's Aff2..Aff0, the part the vGIC keeps.
const IROUTER_AFF: u64 = 0xff_ffff;
/// Priority the own SPIs are left with (any value the priority mask lets through).
const PRIORITY: u8 = 0xa0;
/// How long nothing may be acknowledged where nothing is deliverable.
const QUIET_MS: u64 = 20;
/// How long the own SPIs may take to arrive once routed here.
const DELIVER_MS: u64 = 500;
/// The SGI the check sends.
const SGI: u32 = 15;
/// Own SPIs handled.
const MAX_OWN: usize = 16;
/// ICFGR of the SGIs: edge, read-only.
const ICFGR_EDGE: u32 = 0xaaaa_aaaa;

/// Distributor registers.
mod gicd {
    pub const CTLR: usize = 0x0000;
    pub const TYPER: usize = 0x0004;
    pub const IIDR: usize = 0x0008;
    pub const SETSPI_NSR: usize = 0x0040;
    pub const IGROUPR: usize = 0x0080;
    pub const ISENABLER: usize = 0x0100;
    pub const ICENABLER: usize = 0x0180;
    pub const ISPENDR: usize = 0x0200;
    pub const ICPENDR: usize = 0x0280;
    pub const ISACTIVER: usize = 0x0300;
    pub const ICACTIVER: usize = 0x0380;
    pub const IPRIORITYR: usize = 0x0400;
    pub const ITARGETSR: usize = 0x0800;
    pub const ICFGR: usize = 0x0c00;
    pub const SGIR: usize = 0x0f00;
    pub const IROUTER: usize = 0x6000;
    pub const PIDR2: usize = 0xffe8;
    /// The distributor frame.
    pub const SIZE: usize = 0x1_0000;

    pub const CTLR_ENABLE_GRP1: u32 = 1 << 1;
    pub const CTLR_ARE: u32 = 1 << 4;
    pub const CTLR_DS: u32 = 1 << 6;

    /// RAZ/WI offsets (32-bit): TYPER2, STATUSR, reserved, SETSPI_NSR, CLRSPI_NSR, SETSPI_SR,
    /// CLRSPI_SR, reserved, IGRPMODR0/1, NSACR0/2, SGIR, CPENDSGIR0, SPENDSGIR0, INMIR0,
    /// IGROUPR0E, ISENABLER0E, IPRIORITYR0E, ICFGR0E, IGRPMODR0E, NSACR0E, reserved,
    /// IROUTER0E, IMPLEMENTATION DEFINED, reserved below the ID registers.
    pub const RAZ_WI: [usize; 28] = [
        0x000c, 0x0010, 0x0014, 0x0020, 0x003c, 0x0040, 0x0048, 0x0050, 0x0058, 0x007c, 0x0d00,
        0x0d04, 0x0e00, 0x0e08, 0x0f00, 0x0f10, 0x0f20, 0x0f80, 0x1000, 0x1200, 0x2000, 0x3000,
        0x3400, 0x3600, 0x5ffc, 0x8000, 0xc000, 0xffcc,
    ];
}

/// Redistributor registers: RD_base, and SGI_base at RD_base + [`gicr::SGI`] (whose bitmap
/// registers have the distributor's offsets, register 0 only).
mod gicr {
    pub const CTLR: usize = 0x0000;
    pub const TYPER: usize = 0x0008;
    pub const PROPBASER: usize = 0x0070;
    /// SGI_base, from RD_base.
    pub const SGI: usize = 0x1_0000;
    pub const ICFGR0: usize = 0x0c00;
    pub const ICFGR1: usize = 0x0c04;
    pub const TYPER_LAST: u32 = 1 << 4;
    /// RD_base + SGI_base (no VLPIs).
    pub const STRIDE: usize = 0x2_0000;
    /// RAZ/WI offsets in RD_base (32-bit): reserved.
    pub const RD_RAZ_WI: [usize; 2] = [0x0100, 0x8000];
    /// RAZ/WI offsets in SGI_base (32-bit): IGRPMODR0, NSACR, reserved.
    pub const SGI_RAZ_WI: [usize; 4] = [0x0d00, 0x0e00, 0x1000, 0x8000];
}

/// The set/clear bitmap registers, in the order they are hammered.
const BITMAPS: [(&str, usize); 7] = [
    ("ICENABLER", gicd::ICENABLER),
    ("ICPENDR", gicd::ICPENDR),
    ("ICACTIVER", gicd::ICACTIVER),
    ("IGROUPR", gicd::IGROUPR),
    ("ISPENDR", gicd::ISPENDR),
    ("ISACTIVER", gicd::ISACTIVER),
    ("ISENABLER", gicd::ISENABLER),
];

fn r32(addr: usize) -> u32 {
    // SAFETY: a 32-bit register of the GIC frames the DT names (Device memory in the boot map);
    // GIC register reads have no side effects (ICC_IAR1_EL1 is not one of them).
    unsafe { pci::read32(addr) }
}

fn w32(addr: usize, v: u32) {
    // SAFETY: a 32-bit register of the GIC frames the DT names. PSTATE.I stays masked, so
    // whatever the value makes pending is never taken as an exception.
    unsafe { pci::write32(addr, v) }
}

fn r64(addr: usize) -> u64 {
    // SAFETY: as in `r32`, a 64-bit register (IROUTER, PROPBASER).
    unsafe { pci::read64(addr) }
}

fn w64(addr: usize, v: u64) {
    // SAFETY: as in `w32`, a 64-bit register.
    unsafe { pci::write64(addr, v) }
}

fn r8(addr: usize) -> u8 {
    // SAFETY: as in `r32`, a byte of IPRIORITYR.
    unsafe { pci::read8(addr) }
}

fn w8(addr: usize, v: u8) {
    // SAFETY: as in `w32`, a byte of IPRIORITYR.
    unsafe { pci::write8(addr, v) }
}

/// A set of INTIDs 0..1024.
#[derive(Clone, Copy)]
struct IntidSet([u32; 32]);

impl IntidSet {
    const fn new() -> Self {
        IntidSet([0; 32])
    }

    fn insert(&mut self, i: u32) {
        self.0[(i / 32) as usize] |= 1 << (i % 32);
    }

    fn contains(&self, i: u32) -> bool {
        i < 1024 && self.0[(i / 32) as usize] & (1 << (i % 32)) != 0
    }

    /// The 32 bits of INTIDs 32n..32n + 31.
    fn word(&self, n: usize) -> u32 {
        self.0[n]
    }
}

/// Where an own SPI comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// A PCI function's INTx: forwarded from hardware, read-only trigger.
    Intx(Bdf),
    /// The SMMU's: virtual.
    Smmu,
    /// The console's: virtual.
    Console,
}

#[derive(Clone, Copy)]
struct Own {
    irq: Irq,
    src: Source,
}

impl Own {
    /// Int_config[1] after all ones were written: the DT's trigger where it is read-only.
    fn edge_after_ones(&self) -> bool {
        match self.src {
            Source::Intx(_) => self.irq.edge,
            Source::Smmu | Source::Console => true,
        }
    }
}

/// The VM's own SPIs.
struct Owned {
    list: [Option<Own>; MAX_OWN],
    set: IntidSet,
    overflow: bool,
}

impl Owned {
    fn add(&mut self, irq: Irq, src: Source) {
        if irq.intid < 32 || self.set.contains(irq.intid) {
            return;
        }
        match self.list.iter_mut().find(|o| o.is_none()) {
            Some(slot) => {
                *slot = Some(Own { irq, src });
                self.set.insert(irq.intid);
            }
            None => self.overflow = true,
        }
    }

    fn iter(&self) -> impl Iterator<Item = Own> + '_ {
        self.list.iter().flatten().copied()
    }

    fn len(&self) -> usize {
        self.list.iter().flatten().count()
    }
}

/// Runs the check and records it (skipped on bare QEMU).
pub fn run(report: &mut Report, dt: Option<&DtInfo>, bare: bool) {
    if bare {
        report.skip(
            CHECK,
            "selftest.bare: QEMU's GIC, every SPI exists and is this guest's",
        );
        return;
    }
    report.record(CHECK, check(dt));
}

fn check(dt: Option<&DtInfo>) -> CheckResult {
    let Some(dt) = dt else {
        fail!("no usable DT");
    };
    // SAFETY: the DTB was validated by `dt::parse` at this address; it stays in place and
    // unmodified for the guest's lifetime.
    let fdt = match unsafe { Fdt::from_ptr(dt.addr as *const u8) } {
        Ok(f) => f,
        Err(e) => fail!("cannot parse DTB: {e:?}"),
    };
    let own = owned(&fdt)?;
    let gic = Gic::init(&fdt)?;
    let ctx = Ctx::new(&fdt, dt, &gic, own)?;
    ctx.describe();
    let saved = ctx.save();
    let result = ctx.exercise();
    let restored = ctx.restore(&saved);
    result.and(restored)
}

// ---------------------------------------------------------------- the own SPIs, from the DT

/// The VM's own SPIs: its PCI functions' INTx, the SMMU's and the console's.
fn owned(fdt: &Fdt<'_>) -> Result<Owned, Msg> {
    let mut own = Owned {
        list: [None; MAX_OWN],
        set: IntidSet::new(),
        overflow: false,
    };
    if let Some(node) = fdt.find_compatible(&["pci-host-ecam-generic"]) {
        let bridge = HostBridge::from_dt(fdt)?;
        let mut err = None;
        functions(&bridge, |bdf| {
            let pin = bridge.read8(bdf, 0x3d);
            if err.is_none() && (1..=4).contains(&pin) {
                match intx(fdt, node, bdf, pin) {
                    Ok(irq) => own.add(irq, Source::Intx(bdf)),
                    Err(e) => err = Some(e),
                }
            }
        });
        if let Some(e) = err {
            return Err(e);
        }
    }
    if let Some(node) = fdt.find_compatible(&["arm,smmu-v3"]) {
        gic::irqs(fdt, node, |irq| own.add(irq, Source::Smmu))?;
    }
    if let Some(node) = fdt.find_compatible(&["arm,pl011"]) {
        gic::irqs(fdt, node, |irq| own.add(irq, Source::Console))?;
    }
    ensure!(!own.overflow, "more than {MAX_OWN} own SPIs in the DT");
    ensure!(own.len() > 0, "no SPI of this VM in the DT");
    Ok(own)
}

/// Calls `f` with every function the VM sees (a flat scan of the buses, as `HostBridge::find`).
fn functions(bridge: &HostBridge, mut f: impl FnMut(Bdf)) {
    for bus in bridge.bus_start..=bridge.bus_end {
        let mut any = false;
        for dev in 0..32 {
            let f0 = Bdf { bus, dev, func: 0 };
            if bridge.read16(f0, pci::cfg::VENDOR_ID) == 0xffff {
                continue;
            }
            any = true;
            let funcs = if bridge.read8(f0, pci::cfg::HEADER_TYPE) & 0x80 != 0 {
                8
            } else {
                1
            };
            for func in 0..funcs {
                let bdf = Bdf { bus, dev, func };
                if bridge.read16(bdf, pci::cfg::VENDOR_ID) != 0xffff {
                    f(bdf);
                }
            }
        }
        if !any {
            break;
        }
    }
}

/// The SPI that INTx `pin` (1 = INTA) of `bdf` raises, from the host bridge's `interrupt-map`
/// (child unit address `bdf << 8, 0, 0`, child interrupt `pin`, both under
/// `interrupt-map-mask`), whose parent must be the GIC.
fn intx(fdt: &Fdt<'_>, node: FdtNode<'_, '_>, bdf: Bdf, pin: u8) -> Result<Irq, Msg> {
    let addr_cells = node.cell_sizes().address_cells;
    let int_cells = node
        .property("#interrupt-cells")
        .and_then(|p| p.as_usize())
        .unwrap_or(1);
    let n = addr_cells + int_cells;
    ensure!(
        (1..=8).contains(&n) && addr_cells >= 1,
        "{}: {addr_cells} address and {int_cells} interrupt cells",
        node.name
    );
    let mut want = [0u32; 8];
    want[0] = bdf.rid() << 8;
    want[addr_cells] = u32::from(pin);
    let mut mask = [u32::MAX; 8];
    if let Some(p) = node.property("interrupt-map-mask") {
        for (m, c) in mask.iter_mut().zip(cells(p.value)).take(n) {
            *m = c;
        }
    }
    let Some(map) = node.property("interrupt-map") else {
        fail!("{}: no interrupt-map for {bdf}'s INTx", node.name);
    };
    let mut c = cells(map.value).peekable();
    while c.peek().is_some() {
        let mut child = [0u32; 8];
        for cell in child.iter_mut().take(n) {
            let Some(v) = c.next() else {
                fail!("{}: truncated interrupt-map", node.name);
            };
            *cell = v;
        }
        let Some(ph) = c.next() else {
            fail!("{}: truncated interrupt-map", node.name);
        };
        let Some((parent_addr, parent_int)) = gic::gic_map_cells(fdt, ph)? else {
            fail!(
                "{}: an interrupt-map entry names phandle {ph:#x}, not the GIC",
                node.name
            );
        };
        ensure!(
            parent_int <= 4,
            "{}: the GIC has {parent_int} interrupt cells",
            node.name
        );
        for _ in 0..parent_addr {
            c.next();
        }
        let mut spec = [0u32; 4];
        for cell in spec.iter_mut().take(parent_int) {
            let Some(v) = c.next() else {
                fail!("{}: truncated interrupt-map", node.name);
            };
            *cell = v;
        }
        if (0..n).all(|i| child[i] & mask[i] == want[i] & mask[i]) {
            let irq = gic::map_spi(node, &spec[..parent_int])?;
            ensure!(
                irq.intid >= 32,
                "{}: {bdf} INT{} is INTID {}, not an SPI",
                node.name,
                (b'A' + pin - 1) as char,
                irq.intid
            );
            return Ok(irq);
        }
    }
    fail!(
        "{}: no interrupt-map entry for {bdf} INT{}",
        node.name,
        (b'A' + pin - 1) as char
    )
}

// ---------------------------------------------------------------- the check

/// What the check works on.
struct Ctx {
    dist: usize,
    /// GICD_TYPER.ITLinesNumber.
    lines: u32,
    own: Owned,
    /// RD_base and affinity (MPIDR layout) of each of the VM's redistributors.
    frames: [(usize, u64); MAX_DT_CPUS],
    nframes: usize,
    /// This vCPU's frame.
    me: usize,
    /// The first frame after the VM's last.
    past: usize,
    my_mpidr: u64,
    /// The virtual timer's PPI (forwarded from hardware: read-only trigger), if the DT has one.
    vtimer: Option<u32>,
}

/// What [`Ctx::restore`] puts back.
struct Saved {
    ctlr: u32,
    /// Per frame: ISENABLER0, IPRIORITYR0..7, ICFGR1.
    frames: [(u32, [u32; 8], u32); MAX_DT_CPUS],
}

/// The GICR_TYPER affinity (Aff3.Aff2.Aff1.Aff0) as MPIDR affinity bits.
fn typer_mpidr(hi: u32) -> u64 {
    (u64::from(hi >> 24) << 32) | u64::from(hi & 0xff_ffff)
}

/// Lowest INTID of 32n.. where `got` and `want` differ.
fn first_diff(n: usize, got: u32, want: u32) -> u32 {
    32 * n as u32 + (got ^ want).trailing_zeros()
}

impl Ctx {
    fn new(fdt: &Fdt<'_>, dt: &DtInfo, gic: &Gic, own: Owned) -> Result<Self, Msg> {
        let Some(node) = fdt.find_compatible(&["arm,gic-v3"]) else {
            fail!("no arm,gic-v3 node in the DT");
        };
        let Some((base, size)) = node
            .reg()
            .and_then(|mut r| r.nth(1))
            .map(|r| (r.starting_address as usize, r.size.unwrap_or(0)))
        else {
            fail!("{}: no redistributor region in reg", node.name);
        };
        let stride = node
            .property("redistributor-stride")
            .and_then(|p| p.as_usize())
            .unwrap_or(gicr::STRIDE);
        ensure!(
            stride >= gicr::STRIDE,
            "{}: redistributor-stride {stride:#x}",
            node.name
        );
        let vtimer = fdt
            .find_compatible(&["arm,armv8-timer"])
            .map(|t| {
                let mut n = 0;
                let mut ppi = None;
                gic::irqs(fdt, t, |irq| {
                    // The third: the virtual timer.
                    if n == 2 {
                        ppi = Some(irq.intid);
                    }
                    n += 1;
                })
                .map(|()| ppi)
            })
            .transpose()?
            .flatten();

        let mut ctx = Ctx {
            dist: gic.dist(),
            lines: r32(gic.dist() + gicd::TYPER) & 0x1f,
            own,
            frames: [(0, 0); MAX_DT_CPUS],
            nframes: 0,
            me: usize::MAX,
            past: 0,
            my_mpidr: arch::my_mpidr(),
            vtimer,
        };
        let mut frame = base;
        loop {
            ensure!(
                frame + gicr::STRIDE <= base + size,
                "redistributor frame {frame:#x} lies outside the region {base:#x}+{size:#x} \
                 (no GICR_TYPER.Last before it)"
            );
            ensure!(
                ctx.nframes < MAX_DT_CPUS,
                "more than {MAX_DT_CPUS} redistributors before GICR_TYPER.Last"
            );
            let lo = r32(frame + gicr::TYPER);
            let aff = typer_mpidr(r32(frame + gicr::TYPER + 4));
            if aff == ctx.my_mpidr {
                ctx.me = ctx.nframes;
            }
            ctx.frames[ctx.nframes] = (frame, aff);
            ctx.nframes += 1;
            frame += stride;
            if lo & gicr::TYPER_LAST != 0 {
                break;
            }
        }
        ctx.past = frame;
        ensure!(
            gic.redist() == ctx.frames.get(ctx.me).map_or(0, |f| f.0),
            "no redistributor with this vCPU's affinity {:#x} before GICR_TYPER.Last",
            ctx.my_mpidr
        );
        let cpus = dt.cpu_mpidrs();
        ensure!(
            ctx.nframes == dt.ncpus,
            "{} redistributors up to GICR_TYPER.Last, {} cpus in the DT",
            ctx.nframes,
            dt.ncpus
        );
        for &(frame, aff) in ctx.frames() {
            ensure!(
                cpus.contains(&aff),
                "the redistributor at {frame:#x} has affinity {aff:#x}, no DT cpu has"
            );
        }
        let limit = 32 * (ctx.lines + 1);
        for o in ctx.own.iter() {
            ensure!(
                o.irq.intid < limit,
                "own SPI {} beyond GICD_TYPER.ITLinesNumber {} (INTIDs < {limit})",
                o.irq.intid,
                ctx.lines
            );
        }
        Ok(ctx)
    }

    fn frames(&self) -> &[(usize, u64)] {
        &self.frames[..self.nframes]
    }

    fn d(&self, off: usize) -> usize {
        self.dist + off
    }

    fn describe(&self) {
        println!(
            "selftest: gic-hostile: GICD {:#x} (ITLinesNumber {}: INTIDs < {}), {} \
             redistributor(s) from {:#x} (this vCPU's: {:#x}), next frame {:#x}",
            self.dist,
            self.lines,
            32 * (self.lines + 1),
            self.nframes,
            self.frames[0].0,
            self.frames[self.me].0,
            self.past
        );
        for o in self.own.iter() {
            let trigger = if o.irq.edge { "edge" } else { "level" };
            match o.src {
                Source::Intx(bdf) => println!(
                    "selftest: gic-hostile: own SPI {} ({trigger}): INTx of {bdf}",
                    o.irq.intid
                ),
                Source::Smmu => println!(
                    "selftest: gic-hostile: own SPI {} ({trigger}): SMMU",
                    o.irq.intid
                ),
                Source::Console => println!(
                    "selftest: gic-hostile: own SPI {} ({trigger}): console",
                    o.irq.intid
                ),
            }
        }
    }

    fn save(&self) -> Saved {
        let mut saved = Saved {
            ctlr: r32(self.d(gicd::CTLR)),
            frames: [(0, [0; 8], 0); MAX_DT_CPUS],
        };
        for (s, &(rd, _)) in saved.frames.iter_mut().zip(self.frames()) {
            let sgi = rd + gicr::SGI;
            s.0 = r32(sgi + gicd::ISENABLER);
            for (w, p) in s.1.iter_mut().enumerate() {
                *p = r32(sgi + gicd::IPRIORITYR + 4 * w);
            }
            s.2 = r32(sgi + gicr::ICFGR1);
        }
        saved
    }

    fn exercise(&self) -> CheckResult {
        let prio_mask = self.hammer_dist()?;
        self.routing(prio_mask)?;
        self.raz_wi()?;
        self.redists(prio_mask)?;
        self.sgis()
    }

    // ------------------------------------------------------------ step 1

    /// Step 1; returns the implemented priority bits.
    fn hammer_dist(&self) -> Result<u8, Msg> {
        let ctlr0 = r32(self.d(gicd::CTLR));
        for (_, reg) in BITMAPS {
            for n in 0..32 {
                w32(self.d(reg + 4 * n), u32::MAX);
            }
        }

        for w in 0..256 {
            w32(self.d(gicd::IPRIORITYR + 4 * w), u32::MAX);
        }
        let first = self.own.iter().next().map_or(0, |o| o.irq.intid as usize);
        let prio_mask = r8(self.d(gicd::IPRIORITYR + first));
        ensure!(
            prio_mask.leading_ones() >= 4 && prio_mask.count_ones() == prio_mask.leading_ones(),
            "own SPI {first}: priority 0xff reads back as {prio_mask:#x}, want the top 4 or more \
             bits"
        );
        self.check_priorities(prio_mask, "0xff")?;
        for b in 0..1024 {
            w8(self.d(gicd::IPRIORITYR + b), 0);
        }
        self.check_priorities(0, "0x00")?;

        for w in 0..256 {
            w32(self.d(gicd::ITARGETSR + 4 * w), u32::MAX);
        }
        for w in 0..256 {
            let v = r32(self.d(gicd::ITARGETSR + 4 * w));
            ensure!(
                v == 0,
                "GICD_ITARGETSR{w} = {v:#x} after all ones (affinity routing: RAZ/WI)"
            );
        }

        for w in 0..64 {
            w32(self.d(gicd::ICFGR + 4 * w), u32::MAX);
        }
        for w in 0..64 {
            let v = r32(self.d(gicd::ICFGR + 4 * w));
            let want = (0..16)
                .filter(|&k| {
                    self.own_spi(16 * w as u32 + k)
                        .is_some_and(|o| o.edge_after_ones())
                })
                .fold(0, |acc, k| acc | (2 << (2 * k)));
            ensure!(
                v == want,
                "GICD_ICFGR{w} = {v:#x} after all ones, want {want:#x} (own SPIs: virtual \
                 edge, INTx read-only)"
            );
        }

        for n in 0..1024 {
            w64(self.d(gicd::IROUTER + 8 * n), GARBAGE);
        }
        self.check_irouters(GARBAGE & IROUTER_AFF, "garbage")?;

        let all = gicd::CTLR_ARE | gicd::CTLR_DS | gicd::CTLR_ENABLE_GRP1;
        for (write, want) in [
            (u32::MAX, all),
            (0, gicd::CTLR_ARE | gicd::CTLR_DS),
            (ctlr0, ctlr0),
        ] {
            w32(self.d(gicd::CTLR), write);
            let v = r32(self.d(gicd::CTLR));
            ensure!(
                v == want,
                "GICD_CTLR = {v:#x} after {write:#x}, want {want:#x}"
            );
        }

        for (name, reg) in BITMAPS {
            for n in 0..32 {
                let v = r32(self.d(reg + 4 * n));
                let want = self.own.set.word(n);
                ensure!(
                    v == want,
                    "GICD_{name}{n} = {v:#x} after all ones, want {want:#x}: INTID {} {}",
                    first_diff(n, v, want),
                    if v & !want != 0 {
                        "is not this VM's"
                    } else {
                        "is this VM's"
                    }
                );
            }
        }
        println!(
            "selftest: gic-hostile: GICD all ones: {} foreign INTIDs 32..1023 read 0; own SPIs \
             enabled, pending, active, priority mask {prio_mask:#x}, IROUTER {GARBAGE:#x} reads \
             {:#x}",
            992 - self.own.len(),
            GARBAGE & IROUTER_AFF
        );
        Ok(prio_mask)
    }

    fn own_spi(&self, intid: u32) -> Option<Own> {
        self.own.iter().find(|o| o.irq.intid == intid)
    }

    /// Every IPRIORITYR byte: `own` for the own SPIs, 0 elsewhere.
    fn check_priorities(&self, own: u8, after: &str) -> CheckResult {
        for w in 0..256usize {
            let v = r32(self.d(gicd::IPRIORITYR + 4 * w));
            let want = (0..4u32)
                .filter(|&k| self.own.set.contains(4 * w as u32 + k))
                .fold(0, |acc, k| acc | (u32::from(own) << (8 * k)));
            ensure!(
                v == want,
                "GICD_IPRIORITYR{w} (INTIDs {}..) = {v:#x} after {after}, want {want:#x}",
                4 * w
            );
        }
        Ok(())
    }

    /// Every IROUTER: `own` for the own SPIs, 0 elsewhere.
    fn check_irouters(&self, own: u64, after: &str) -> CheckResult {
        for n in 0..1024u32 {
            let v = r64(self.d(gicd::IROUTER + 8 * n as usize));
            let want = if self.own.set.contains(n) { own } else { 0 };
            ensure!(
                v == want,
                "GICD_IROUTER{n} = {v:#x} after {after}, want {want:#x}"
            );
        }
        Ok(())
    }

    // ------------------------------------------------------------ step 2

    /// Writes `regs` with the own SPIs' bits.
    fn own_bits(&self, regs: &[usize]) {
        for &reg in regs {
            for n in 0..32 {
                let bits = self.own.set.word(n);
                if bits != 0 {
                    w32(self.d(reg + 4 * n), bits);
                }
            }
        }
    }

    /// Every word of `reg` reads `want(n)`.
    fn bitmap_is(
        &self,
        name: &str,
        reg: usize,
        want: impl Fn(usize) -> u32,
        when: &str,
    ) -> CheckResult {
        for n in 0..32 {
            let v = r32(self.d(reg + 4 * n));
            let w = want(n);
            ensure!(
                v == w,
                "GICD_{name}{n} = {v:#x} {when}, want {w:#x} (INTID {})",
                first_diff(n, v, w)
            );
        }
        Ok(())
    }

    /// Disables the own SPIs and clears their pending and active state.
    fn clear_own(&self) {
        self.own_bits(&[gicd::ICENABLER, gicd::ICPENDR, gicd::ICACTIVER]);
    }

    /// The own SPIs' priority and trigger as `smmu-irq` expects them (IROUTER aside).
    fn configure_own(&self, prio_mask: u8) -> CheckResult {
        for o in self.own.iter() {
            let i = o.irq.intid as usize;
            w8(self.d(gicd::IPRIORITYR + i), PRIORITY);
            let p = r8(self.d(gicd::IPRIORITYR + i));
            ensure!(
                p == PRIORITY & prio_mask,
                "own SPI {i}: priority {p:#x}, wrote {PRIORITY:#x}"
            );
            let cfg = self.d(gicd::ICFGR + 4 * (i / 16));
            let edge = 2u32 << (2 * (i % 16));
            let old = r32(cfg);
            w32(cfg, if o.irq.edge { old | edge } else { old & !edge });
            ensure!(
                (r32(cfg) & edge != 0) == o.irq.edge,
                "own SPI {i}: ICFGR does not take the DT's trigger"
            );
        }
        Ok(())
    }

    /// Routes every own SPI to affinity `mpidr`.
    fn route_own(&self, mpidr: u64) {
        for o in self.own.iter() {
            w64(self.d(gicd::IROUTER + 8 * o.irq.intid as usize), mpidr);
        }
    }

    /// Step 2.
    fn routing(&self, prio_mask: u8) -> CheckResult {
        self.clear_own();
        for (name, reg) in [
            ("ISENABLER", gicd::ISENABLER),
            ("ISPENDR", gicd::ISPENDR),
            ("ISACTIVER", gicd::ISACTIVER),
        ] {
            self.bitmap_is(name, reg, |_| 0, "after clearing the own SPIs")?;
        }
        self.configure_own(prio_mask)?;
        for &(_, aff) in self.frames() {
            self.route_own(aff);
            self.check_irouters(aff, "naming a vCPU of this VM")?;
        }
        self.route_own(GARBAGE);
        self.check_irouters(GARBAGE & IROUTER_AFF, "garbage")?;
        quiet("with every own SPI cleared")?;

        // Pending and enabled, routed to no vCPU: delivered nowhere.
        self.own_bits(&[gicd::ISPENDR, gicd::ISENABLER]);
        self.bitmap_is(
            "ISPENDR",
            gicd::ISPENDR,
            |n| self.own.set.word(n),
            "after setting the own SPIs pending",
        )?;
        quiet("while the own SPIs are routed to no vCPU (IROUTER names none of this VM)")?;

        // Routed here: each arrives once.
        self.route_own(self.my_mpidr);
        let deadline = Deadline::after_ms(DELIVER_MS);
        let mut taken = IntidSet::new();
        let mut count = 0;
        while count < self.own.len() {
            let Some(i) = gic::wait_ack(&deadline) else {
                let missing = self
                    .own
                    .iter()
                    .find(|o| !taken.contains(o.irq.intid))
                    .map_or(0, |o| o.irq.intid);
                fail!(
                    "own SPI {missing} not delivered within {DELIVER_MS} ms of routing it to this \
                     vCPU ({count} of {} were)",
                    self.own.len()
                );
            };
            gic::eoi(i);
            ensure!(
                self.own.set.contains(i),
                "INTID {i} (not this VM's) acknowledged while taking the own SPIs"
            );
            ensure!(!taken.contains(i), "own SPI {i} acknowledged twice");
            taken.insert(i);
            count += 1;
        }
        quiet("after each own SPI was taken once")?;
        self.clear_own();
        println!(
            "selftest: gic-hostile: routing: own SPIs pending+enabled with IROUTER {GARBAGE:#x}: \
             delivered nowhere; routed here: each taken once ({count})"
        );
        Ok(())
    }

    // ------------------------------------------------------------ step 3

    /// Step 3.
    fn raz_wi(&self) -> CheckResult {
        for off in gicd::RAZ_WI {
            let addr = self.d(off) as u64;
            no_abort(probe_write(addr, u32::MAX), "GICD", off, "write")?;
            let (p, v) = probe_read(addr);
            no_abort(p, "GICD", off, "read")?;
            ensure!(v == 0, "GICD+{off:#x} = {v:#x} after all ones (RAZ/WI)");
        }
        for off in [gicd::TYPER, gicd::IIDR, gicd::PIDR2] {
            let before = r32(self.d(off));
            w32(self.d(off), u32::MAX);
            let after = r32(self.d(off));
            ensure!(
                before == after,
                "read-only GICD+{off:#x} changed from {before:#x} to {after:#x}"
            );
        }
        // The legacy SGI registers among them (SGIR, SPENDSGIR) made no SGI pending.
        for &(rd, aff) in self.frames() {
            let v = r32(rd + gicr::SGI + gicd::ISPENDR);
            ensure!(
                v & 0xffff == 0,
                "SGIs {v:#x} pending on vCPU {aff:#x} after the RAZ/WI writes"
            );
        }
        for intid in 0..1024 {
            w32(self.d(gicd::SETSPI_NSR), intid);
        }
        self.bitmap_is(
            "ISPENDR",
            gicd::ISPENDR,
            |_| 0,
            "after SETSPI_NSR with every INTID (no message-based SPIs)",
        )?;

        // What the vGIC cannot take: the wrong size, outside the frame.
        let ctlr = self.d(gicd::CTLR) as u64;
        expect_sea(probe_write8(ctlr, 0), ctlr)
            .map_err(|e| Msg::new(format_args!("byte store to GICD_CTLR: {e}")))?;
        expect_sea(probe_read64(ctlr), ctlr)
            .map_err(|e| Msg::new(format_args!("64-bit load of GICD_CTLR: {e}")))?;
        for off in [gicd::SIZE, gicd::SIZE + gicd::ISENABLER] {
            let addr = self.d(off) as u64;
            outside(addr).map_err(|e| Msg::new(format_args!("GICD+{off:#x}: {e}")))?;
        }
        println!(
            "selftest: gic-hostile: {} RAZ/WI offsets took all ones without an abort, SETSPI_NSR \
             raised nothing; wrong-size accesses and GICD+{:#x} abort",
            gicd::RAZ_WI.len(),
            gicd::SIZE
        );
        Ok(())
    }

    // ------------------------------------------------------------ step 4

    /// Step 4.
    fn redists(&self, prio_mask: u8) -> CheckResult {
        for (i, &(rd, aff)) in self.frames().iter().enumerate() {
            self.hammer_redist(rd, i == self.me, prio_mask)
                .map_err(|e| Msg::new(format_args!("redistributor {rd:#x} ({aff:#x}): {e}")))?;
        }
        let past = self.past as u64;
        outside(past + gicr::TYPER as u64)
            .map_err(|e| Msg::new(format_args!("GICR_TYPER past the last frame: {e}")))?;
        let isenabler = past + (gicr::SGI + gicd::ISENABLER) as u64;
        outside(isenabler)
            .map_err(|e| Msg::new(format_args!("GICR_ISENABLER0 past the last frame: {e}")))?;
        println!(
            "selftest: gic-hostile: SGIs/PPIs hammered in the VM's {} redistributor(s) (other \
             vCPUs' too: same VM); past the last, {past:#x}: loads and stores abort",
            self.nframes
        );
        Ok(())
    }

    fn hammer_redist(&self, rd: usize, mine: bool, prio_mask: u8) -> CheckResult {
        let sgi = rd + gicr::SGI;
        for reg in [gicd::ICENABLER, gicd::ICPENDR, gicd::ICACTIVER] {
            w32(sgi + reg, u32::MAX);
        }
        w32(sgi + gicd::IGROUPR, 0);
        w32(sgi + gicd::ISPENDR, u32::MAX);
        w32(sgi + gicd::ISACTIVER, u32::MAX);
        if !mine {
            w32(sgi + gicd::ISENABLER, u32::MAX);
        }
        let enabled = if mine { 0 } else { u32::MAX };
        for (name, reg, want) in [
            ("IGROUPR0", gicd::IGROUPR, u32::MAX),
            ("ISENABLER0", gicd::ISENABLER, enabled),
            ("ICENABLER0", gicd::ICENABLER, enabled),
            ("ISPENDR0", gicd::ISPENDR, u32::MAX),
            ("ICPENDR0", gicd::ICPENDR, u32::MAX),
            ("ISACTIVER0", gicd::ISACTIVER, u32::MAX),
            ("ICACTIVER0", gicd::ICACTIVER, u32::MAX),
        ] {
            let v = r32(sgi + reg);
            ensure!(v == want, "GICR_{name} = {v:#x}, want {want:#x}");
        }

        for w in 0..8 {
            w32(sgi + gicd::IPRIORITYR + 4 * w, u32::MAX);
        }
        for b in 0..32 {
            let p = r8(sgi + gicd::IPRIORITYR + b);
            ensure!(
                p == prio_mask,
                "INTID {b}: priority 0xff reads {p:#x}, want {prio_mask:#x}"
            );
            w8(sgi + gicd::IPRIORITYR + b, 0);
            let p = r8(sgi + gicd::IPRIORITYR + b);
            ensure!(p == 0, "INTID {b}: priority 0 reads {p:#x}");
        }

        w32(sgi + gicr::ICFGR0, 0);
        let v = r32(sgi + gicr::ICFGR0);
        ensure!(
            v == ICFGR_EDGE,
            "GICR_ICFGR0 = {v:#x} after 0, want {ICFGR_EDGE:#x} (SGIs: edge, read-only)"
        );
        w32(sgi + gicr::ICFGR1, u32::MAX);
        let fixed = self.vtimer.map_or(0, |t| 3 << (2 * (t % 16)));
        let v = r32(sgi + gicr::ICFGR1);
        let want = ICFGR_EDGE & !fixed;
        ensure!(
            v == want,
            "GICR_ICFGR1 = {v:#x} after all ones, want {want:#x} (the virtual timer's PPI \
             {:?}: level, read-only)",
            self.vtimer
        );

        for off in gicr::RD_RAZ_WI.into_iter().chain([gicr::CTLR]) {
            let addr = (rd + off) as u64;
            no_abort(probe_write(addr, u32::MAX), "RD_base", off, "write")?;
            let (p, v) = probe_read(addr);
            no_abort(p, "RD_base", off, "read")?;
            ensure!(v == 0, "RD_base+{off:#x} = {v:#x} after all ones (RAZ/WI)");
        }
        for off in gicr::SGI_RAZ_WI {
            let addr = (sgi + off) as u64;
            no_abort(probe_write(addr, u32::MAX), "SGI_base", off, "write")?;
            let (p, v) = probe_read(addr);
            no_abort(p, "SGI_base", off, "read")?;
            ensure!(v == 0, "SGI_base+{off:#x} = {v:#x} after all ones (RAZ/WI)");
        }
        w64(rd + gicr::PROPBASER, u64::MAX);
        let v = r64(rd + gicr::PROPBASER);
        ensure!(v == 0, "GICR_PROPBASER = {v:#x} after all ones (no LPIs)");

        for reg in [gicd::ICPENDR, gicd::ICACTIVER, gicd::ICENABLER] {
            w32(sgi + reg, u32::MAX);
        }
        for (name, reg) in [
            ("ISENABLER0", gicd::ISENABLER),
            ("ISPENDR0", gicd::ISPENDR),
            ("ISACTIVER0", gicd::ISACTIVER),
        ] {
            let v = r32(sgi + reg);
            ensure!(v == 0, "GICR_{name} = {v:#x} after clearing everything");
        }
        Ok(())
    }

    // ------------------------------------------------------------ step 5

    /// Which frames have [`SGI`] pending.
    fn sgi_pending(&self) -> u32 {
        self.frames()
            .iter()
            .enumerate()
            .filter(|&(_, &(rd, _))| r32(rd + gicr::SGI + gicd::ISPENDR) & (1 << SGI) != 0)
            .fold(0, |acc, (i, _)| acc | (1 << i))
    }

    fn clear_sgi(&self) {
        for &(rd, _) in self.frames() {
            w32(rd + gicr::SGI + gicd::ICPENDR, 1 << SGI);
        }
    }

    /// The frames an ICC_SGI1R_EL1 write of `value` by this vCPU targets (the architecture's
    /// rule, applied to the VM's vCPUs).
    fn sgi_targets(&self, value: u64) -> u32 {
        let irm = value & (1 << 40) != 0;
        let list = value & 0xffff;
        let rs = (value >> 44) & 0xf;
        let (aff3, aff2, aff1) = (
            (value >> 48) & 0xff,
            (value >> 32) & 0xff,
            (value >> 16) & 0xff,
        );
        self.frames()
            .iter()
            .enumerate()
            .filter(|&(i, &(_, mpidr))| {
                if irm {
                    return i != self.me;
                }
                let aff0 = mpidr & 0xff;
                (mpidr >> 32) & 0xff == aff3
                    && (mpidr >> 16) & 0xff == aff2
                    && (mpidr >> 8) & 0xff == aff1
                    && aff0 / 16 == rs
                    && list & (1 << (aff0 % 16)) != 0
            })
            .fold(0, |acc, (i, _)| acc | (1 << i))
    }

    /// Step 5.
    fn sgis(&self) -> CheckResult {
        let intid = u64::from(SGI) << 24;
        // The VM's vCPUs with Aff3..Aff1 = 0, Aff0 < 16 (vCPU i is 0.0.0.i).
        let own_list = self
            .frames()
            .iter()
            .filter(|&&(_, m)| m < 16)
            .fold(0u64, |acc, &(_, m)| acc | (1 << m));
        let cases: [(&str, u64, bool); 7] = [
            ("IRM = 1", intid | (1 << 40), true),
            ("target list of this VM's vCPUs", intid | own_list, true),
            ("Aff1 = 1, Aff0 0..15", intid | (1 << 16) | 0xffff, false),
            ("Aff2 = 1, Aff0 0..15", intid | (1 << 32) | 0xffff, false),
            ("Aff3 = 1, Aff0 0..15", intid | (1 << 48) | 0xffff, false),
            ("RS = 1 (Aff0 16..31)", intid | (1 << 44) | 0xffff, false),
            (
                "Aff0 past this VM's vCPUs",
                intid | (0xffff & !own_list),
                false,
            ),
        ];
        self.clear_sgi();
        let mut foreign = 0;
        for (what, value, ours) in cases {
            let want = self.sgi_targets(value);
            // Affinities outside the VM (with up to 16 vCPUs, all of them Aff0 < 16).
            ensure!(
                ours || want == 0 || self.nframes > 16,
                "{what}: names vCPUs {want:#x} of this VM"
            );
            gic::send_sgi1r(value);
            let got = self.sgi_pending();
            self.clear_sgi();
            ensure!(
                got == want,
                "ICC_SGI1R_EL1 {value:#x} ({what}): SGI {SGI} pending on frames {got:#x}, want \
                 {want:#x}"
            );
            foreign += usize::from(!ours);
        }
        // The legacy GICD_SGIR (ARE = 0 only): "every other PE", then all ones.
        for value in [(1 << 24) | SGI, u32::MAX] {
            w32(self.d(gicd::SGIR), value);
            let got = self.sgi_pending();
            self.clear_sgi();
            ensure!(
                got == 0,
                "GICD_SGIR {value:#x}: SGI {SGI} pending on frames {got:#x} (RAZ/WI with \
                 affinity routing)"
            );
        }
        println!(
            "selftest: gic-hostile: ICC_SGI1R_EL1: IRM = 1 and a list of this VM's vCPUs reached \
             exactly those; {foreign} lists naming other affinities and GICD_SGIR: no vCPU"
        );
        Ok(())
    }

    // ------------------------------------------------------------ restore

    /// Leaves the GIC as `smmu-irq` expects it, whatever happened.
    fn restore(&self, saved: &Saved) -> CheckResult {
        self.clear_own();
        self.route_own(self.my_mpidr);
        for o in self.own.iter() {
            let i = o.irq.intid as usize;
            w8(self.d(gicd::IPRIORITYR + i), PRIORITY);
            let cfg = self.d(gicd::ICFGR + 4 * (i / 16));
            let edge = 2u32 << (2 * (i % 16));
            let old = r32(cfg);
            w32(cfg, if o.irq.edge { old | edge } else { old & !edge });
        }
        w32(self.d(gicd::CTLR), saved.ctlr);
        for (&(rd, _), s) in self.frames().iter().zip(&saved.frames) {
            let sgi = rd + gicr::SGI;
            for reg in [gicd::ICENABLER, gicd::ICPENDR, gicd::ICACTIVER] {
                w32(sgi + reg, u32::MAX);
            }
            for (w, &p) in s.1.iter().enumerate() {
                w32(sgi + gicd::IPRIORITYR + 4 * w, p);
            }
            w32(sgi + gicr::ICFGR1, s.2);
            w32(sgi + gicd::ISENABLER, s.0);
        }
        // Whatever a failed step left acknowledgeable.
        for _ in 0..64 {
            let i = gic::ack();
            if gic::is_special(i) {
                break;
            }
            gic::eoi(i);
        }
        for (name, reg) in [
            ("ISENABLER", gicd::ISENABLER),
            ("ISPENDR", gicd::ISPENDR),
            ("ISACTIVER", gicd::ISACTIVER),
        ] {
            self.bitmap_is(name, reg, |_| 0, "after restoring")?;
        }
        self.check_irouters(self.my_mpidr & IROUTER_AFF, "restoring")?;
        let ctlr = r32(self.d(gicd::CTLR));
        ensure!(
            ctlr == saved.ctlr,
            "GICD_CTLR = {ctlr:#x} after restoring {:#x}",
            saved.ctlr
        );
        Ok(())
    }
}

/// Fails if any interrupt is acknowledged within [`QUIET_MS`].
fn quiet(when: &str) -> CheckResult {
    if let Some(i) = gic::wait_ack(&Deadline::after_ms(QUIET_MS)) {
        gic::eoi(i);
        fail!("INTID {i} acknowledged {when}");
    }
    Ok(())
}

/// The access at `frame`+`off` did not abort.
fn no_abort(p: Probe, frame: &str, off: usize, what: &str) -> CheckResult {
    if let Some(t) = p.taken {
        fail!(
            "{what} of {frame}+{off:#x} (RAZ/WI) aborted: ESR {:#x}, FAR {:#x}",
            t.esr,
            t.far
        );
    }
    Ok(())
}

/// A load and a store at `addr`, which the VM does not own, take a synchronous external abort.
/// The store writes all ones if the load aborted, else what the load returned.
fn outside(addr: u64) -> CheckResult {
    let (p, v) = probe_read(addr);
    let read_aborted = p.taken.is_some();
    expect_sea(p, addr).map_err(|e| Msg::new(format_args!("load: {e}")))?;
    let value = if read_aborted { u32::MAX } else { v };
    expect_sea(probe_write(addr, value), addr).map_err(|e| Msg::new(format_args!("store: {e}")))
}

/// A byte store of `value` to `addr`.
fn probe_write8(addr: u64, value: u8) -> Probe {
    let mut pc = 0;
    let taken = exception::expect_abort(|| {
        // SAFETY: `addr` is a GIC register; if the store is (wrongly) taken, it writes `value`
        // to it, which the caller chose to be harmless. Otherwise the armed handler steps over
        // this single instruction.
        unsafe {
            asm!(
                "adr {pc}, 2f",
                "2: strb {v:w}, [{a}]",
                a = in(reg) addr,
                v = in(reg) u32::from(value),
                pc = out(reg) pc,
                options(nostack, preserves_flags),
            )
        };
    });
    Probe { taken, pc }
}

/// A 64-bit load from `addr`.
fn probe_read64(addr: u64) -> Probe {
    let mut pc = 0;
    let taken = exception::expect_abort(|| {
        // SAFETY: `addr` is a GIC register, whose reads have no side effects; the armed handler
        // steps over this single instruction if it aborts.
        unsafe {
            asm!(
                "adr {pc}, 2f",
                "2: ldr {v}, [{a}]",
                a = in(reg) addr,
                v = out(reg) _,
                pc = out(reg) pc,
                options(nostack, preserves_flags),
            )
        };
    });
    Probe { taken, pc }
}
